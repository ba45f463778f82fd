"""``imagen-worker``: the daemon and its admin commands."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from imagen_worker.config import load_config
from imagen_worker.db import migrate as migrations
from imagen_worker.db.connect import connect, resolve_dsn
from imagen_worker.errors import ConfigError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="imagen.yaml (default: $IMAGEN_CONFIG or ~/.config)")
]


@app.callback()
def _root() -> None:
    """imagen-worker: the queue daemon and its admin commands."""


def _fail(message: str) -> typer.Exit:
    typer.echo(f"imagen-worker: {message}", err=True)
    return typer.Exit(1)


@app.command()
def migrate(
    config_path: ConfigOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the SQL, change nothing.")] = False,
) -> None:
    """Apply pending schema migrations (safe to run from several hosts at once)."""

    async def run() -> None:
        config = load_config(config_path)
        conn = await connect(resolve_dsn(config))
        try:
            if dry_run:
                sql = await migrations.dry_run(conn)
                typer.echo(sql or "-- nothing to apply: the schema is up to date")
            else:
                done = await migrations.migrate(conn)
                typer.echo(f"applied {', '.join(done)}" if done else "schema is up to date")
        finally:
            await conn.close()

    try:
        asyncio.run(run())
    except ConfigError as exc:
        raise _fail(str(exc)) from None


def main() -> None:
    app()
