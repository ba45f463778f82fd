"""``imagen-worker``: the daemon and its admin commands."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any

import typer

from imagen_worker.config import collect_problems, load_config
from imagen_worker.db import migrate as migrations
from imagen_worker.db.connect import connect, resolve_dsn
from imagen_worker.errors import ConfigError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="The imagen queue worker (run) and its admin commands.",
)

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


@app.command()
def run(
    config_path: ConfigOption = None,
    no_migrate: Annotated[bool, typer.Option("--no-migrate", help="Do not apply migrations first.")] = False,
    no_metrics: Annotated[
        bool, typer.Option("--no-metrics", help="Do not serve /metrics, /healthz, /readyz.")
    ] = False,
    log_level: Annotated[str, typer.Option("--log-level", help="debug|info|warning|error")] = "info",
    log_format: Annotated[str, typer.Option("--log-format", help="auto|console|json")] = "auto",
) -> None:
    """Run the worker until SIGTERM/SIGINT (a second signal stops waiting for in-flight jobs)."""
    from imagen_worker.observability.logging import config_secret_env_names, configure_logging
    from imagen_worker.worker.service import Service

    try:
        config = load_config(config_path)
        configure_logging(log_level, log_format, secret_env=config_secret_env_names(config))  # type: ignore[arg-type]
    except (ConfigError, ValueError) as exc:
        raise _fail(str(exc)) from None

    async def serve() -> None:
        service = Service(
            config, resolve_dsn(config), run_migrations=not no_migrate, serve_metrics=not no_metrics
        )
        await service.run()

    try:
        asyncio.run(serve())
    except ConfigError as exc:
        raise _fail(str(exc)) from None


@app.command()
def check(config_path: ConfigOption = None) -> None:
    """Check config, database and migration level, backends and storage; non-zero on problems."""
    from rich.console import Console

    from imagen_worker.check import render_table, run_checks

    async def go() -> list[Any]:
        config, problems = collect_problems(config_path)
        if config is None:
            raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
        return await run_checks(config, dsn=resolve_dsn(config))

    try:
        results = asyncio.run(go())
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    Console().print(render_table(results))
    failed = [r for r in results if not r.ok]
    for result in failed:
        typer.echo(f"imagen-worker: {result.name}: {result.detail}", err=True)
    raise typer.Exit(1 if failed else 0)


def main() -> None:
    app()
