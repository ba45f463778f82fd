"""``imagen db``: the embedded PostgreSQL that a config without a database URL uses."""

from __future__ import annotations

import typer

from imagen_worker.db import embedded

app = typer.Typer(
    add_completion=False, no_args_is_help=True, rich_markup_mode=None, help="The embedded PostgreSQL."
)


@app.command("status")
def show_status() -> None:
    """Say whether the embedded server runs, where its data lives, and how to reach it."""
    current = embedded.status()
    if current.running:
        typer.echo(f"running (pid {current.pid}), data in {current.directory}")
        if current.socket_dir:
            typer.echo(f"connect: psql 'postgresql://postgres@/postgres?host={current.socket_dir}'")
    elif current.initialised:
        typer.echo(f"stopped, data in {current.directory} (the next imagen command starts it)")
    else:
        typer.echo(f"not created: no data in {current.directory} (the first imagen command creates it)")


@app.command()
def stop() -> None:
    """Stop the embedded server; its data stays, and the next command starts it again."""
    if embedded.stop():
        typer.echo(f"stopped the embedded server ({embedded.default_directory()})")
    else:
        typer.echo("the embedded server was not running")
