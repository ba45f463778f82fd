"""``imagen-worker``: the daemon and its admin commands."""

from __future__ import annotations

import asyncio
import errno
import socket
from typing import Annotated, Any

import typer

from imagen_worker.cli import failures
from imagen_worker.cli.common import ConfigOption
from imagen_worker.cli.failures import Code, PortInUse
from imagen_worker.config import Config, collect_problems, describe_file, load_config, one_line
from imagen_worker.db import migrate as migrations
from imagen_worker.db.connect import connect, describe_dsn, resolve_dsn
from imagen_worker.errors import ConfigError

PROGRAM = "imagen-worker"

app = typer.Typer(
    add_completion=False,
    rich_markup_mode=None,  # plain help: flags without a "<bool>" type column
    no_args_is_help=True,
    help="The imagen queue worker (run) and its admin commands.",
)


@app.callback()
def _root(
    _version: Annotated[bool, failures.version_option(PROGRAM)] = False,
    _debug: failures.DebugFlag = False,
) -> None:
    """imagen-worker: the queue daemon and its admin commands."""


def _target(config: Config) -> str:
    dsn = resolve_dsn(config)
    target = describe_dsn(dsn)
    failures.set_database(target if config.database_url() else f"the embedded server ({target})")
    return dsn


@app.command()
def migrate(
    config_path: ConfigOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the SQL, change nothing.")] = False,
) -> None:
    """Apply pending schema migrations (safe to run from several hosts at once)."""

    async def go() -> None:
        config = load_config(config_path)
        conn = await connect(_target(config))
        try:
            if dry_run:
                sql = await migrations.dry_run(conn)
                typer.echo(sql or "-- nothing to apply: the schema is up to date")
            else:
                done = await migrations.migrate(conn)
                typer.echo(f"applied {', '.join(done)}" if done else "schema is up to date")
        finally:
            await conn.close()

    failures.guarded(PROGRAM, lambda: asyncio.run(go()))


def ensure_port_free(config: Config) -> None:
    """Refuse a taken metrics port before the worker registers, recovers leases or claims."""
    host, port = config.metrics.host, config.metrics.port
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            raise PortInUse(
                errno.EADDRINUSE,
                f"metrics.port: {host}:{port} is already in use (another worker on this host?); "
                "set metrics.port (IMAGEN_METRICS__PORT) to a free port, 0 = any free port, "
                "or run with --no-metrics",
            ) from None


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
    import sys

    import structlog

    from imagen_worker.observability.logging import config_secret_env_names, configure_logging
    from imagen_worker.worker.allocator import pin_malloc_thresholds
    from imagen_worker.worker.service import Service

    # Failures before the first log line use the format the logs will have, so a start-up
    # error under systemd or docker is one JSON record like every other line.
    failures.state.json_lines = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())

    def prepare() -> Config:
        try:
            configure_logging(log_level, log_format)  # type: ignore[arg-type]
        except ValueError as exc:
            raise failures.InputError(str(exc)) from None
        config = load_config(config_path)
        configure_logging(log_level, log_format, secret_env=config_secret_env_names(config))  # type: ignore[arg-type]
        if not no_metrics and config.metrics.enabled:
            ensure_port_free(config)
        return config

    config = failures.guarded(PROGRAM, prepare)
    structlog.get_logger("imagen_worker").info("configuration", file=describe_file(config_path))
    # Before the first connection: weeks of 256 KiB socket reads must not fragment the heap.
    pinned = pin_malloc_thresholds()
    structlog.get_logger("imagen_worker").debug("malloc thresholds", pinned=pinned)

    async def serve() -> None:
        service = Service(
            config, _target(config), run_migrations=not no_migrate, serve_metrics=not no_metrics
        )
        await service.run()

    failures.guarded(PROGRAM, lambda: asyncio.run(serve()))


@app.command()
def check(config_path: ConfigOption = None) -> None:
    """Check config, database and migration level, backends and storage; non-zero on problems."""
    from rich.console import Console

    from imagen_worker.check import render_table, run_checks

    async def go() -> list[Any]:
        config, problems = collect_problems(config_path)
        if config is None:
            raise ConfigError(one_line(config_path, problems))
        return await run_checks(config, dsn=_target(config), config_path=config_path)

    results = failures.guarded(PROGRAM, lambda: asyncio.run(go()))
    Console().print(render_table(results))
    failed = [r for r in results if not r.ok]
    for result in failed:
        typer.echo(f"{PROGRAM}: {result.name}: {result.detail}", err=True)
    raise typer.Exit(Code.FAILED if failed else Code.OK)


def main() -> None:
    failures.main(app, PROGRAM)
