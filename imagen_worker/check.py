"""``imagen-worker check``: everything the daemon needs, tested once, in words.

Run it after an install or a config change and before ``systemctl restart``: each line is
one thing the worker depends on (config, output directory, database, schema, LISTEN/NOTIFY,
each backend, storage credentials), checked with a timeout so a dead dependency shows as a
red line instead of a hang. Checks that do not depend on each other run concurrently.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from rich.table import Table
from rich.text import Text

from imagen_worker import backends
from imagen_worker.cli.config_cmd import check as validate
from imagen_worker.config import Config, collect_problems, config_file, resolve_path
from imagen_worker.db import migrate as migrations
from imagen_worker.db.connect import connect, describe_dsn
from imagen_worker.errors import ConfigError, JobError
from imagen_worker.observability.logging import Redactor
from imagen_worker.queries import sql
from imagen_worker.worker import disk


@dataclass(frozen=True)
class CheckResult:
    """One line of the report. ``skipped`` lines are ok: nothing to check, or no way to check it."""

    name: str
    ok: bool
    detail: str
    skipped: bool = False


def _error_text(exc: BaseException) -> str:
    """Our own errors are sentences already; anything else gets its class name."""
    if isinstance(exc, JobError):
        message = exc.message
    else:
        text = str(exc).strip()
        message = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return Redactor.from_env().scrub(message)


def _config_result(path: str | Path | None) -> CheckResult:
    """``imagen config validate``'s report: file and environment, adapters' blocks, cross-references."""
    report = validate(Path(path) if path is not None else None)
    if report.errors:
        return CheckResult("config", False, "; ".join(report.errors))
    _file, origin = config_file(path)
    where = str(report.path) if report.exists else f"no file at {report.path}: defaults and environment"
    if origin is not None and report.exists:
        where += f", from {origin}"
    warnings = "".join(f"; warning: {w}" for w in report.warnings)
    return CheckResult("config", True, f"valid ({where}){warnings}")


def _output_result(directory: Path, min_free_mb: int) -> CheckResult:
    probe = disk.existing(directory)
    if not probe.is_dir():
        return CheckResult("output directory", False, f"{directory}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        return CheckResult("output directory", False, f"{directory}: {probe} is not writable by this user")
    free_mb = disk.free_bytes(probe) // disk.MIB
    if free_mb < min_free_mb:
        detail = (
            f"{directory}: {free_mb} MiB free, below output.min_free_mb ({min_free_mb}): "
            "`run` would claim nothing"
        )
        return CheckResult("output directory", False, detail)
    note = "" if probe == directory else " (will be created)"
    return CheckResult("output directory", True, f"{directory} writable{note}, {free_mb} MiB free")


async def _database_results(dsn: str | None, seconds: float) -> list[CheckResult]:
    if not dsn:
        note = "none configured: `run` would use the embedded server"
        return [CheckResult("database", True, note, skipped=True)]
    target = describe_dsn(dsn)
    try:
        conn = await asyncio.wait_for(connect(dsn, timeout=seconds), timeout=seconds + 1)
    except Exception as exc:
        return [CheckResult("database", False, f"cannot connect to {target}: {_error_text(exc)}")]
    results = []
    try:
        # "15.20 (Debian 15.20-0+deb12u1)": the number is what an operator compares.
        version = str(await conn.fetchval(sql("server_version"))).split(" ", 1)[0]
        results.append(CheckResult("database", True, f"connected to {target} (PostgreSQL {version})"))
        results.append(await _migration_result(conn))
        results.append(await _listen_result(conn, seconds))
        results.extend(await _fleet_results(conn))
    finally:
        await conn.close()
    return results


async def _migration_result(conn: asyncpg.Connection) -> CheckResult:
    try:
        todo = await migrations.pending(conn)
        done: dict[str, str] = await migrations.applied(conn)
    except ConfigError as exc:
        return CheckResult("migrations", False, str(exc))
    except Exception as exc:
        return CheckResult("migrations", False, f"cannot read the schema level: {_error_text(exc)}")
    if todo:
        # Not a failure: a fresh database is checked before it is migrated, and `run` migrates
        # at start. The line stays yellow so it is not missed.
        names = ", ".join(m.version for m in todo)
        return CheckResult(
            "migrations",
            True,
            f"{len(todo)} pending ({names}): run `imagen-worker migrate` (`run` applies them at start "
            "unless --no-migrate)",
            skipped=True,
        )
    known = {m.version for m in migrations.discover()}
    newer = sorted(set(done) - known)
    latest = max(known) if known else "none"
    if newer:
        return CheckResult(
            "migrations", True, f"up to date ({latest}); the database also has newer {', '.join(newer)}"
        )
    return CheckResult("migrations", True, f"up to date ({latest})")


async def _fleet_results(conn: asyncpg.Connection) -> list[CheckResult]:
    """A warning line when live workers disagree about ``default_backend`` (else nothing):
    jobs without a backend would then render with whichever worker claims them first."""
    try:
        rows = await conn.fetch(sql("live_default_backends"))
    except asyncpg.PostgresError:
        return []  # the schema predates the registry's default_backend: the migrations line says so
    if len(rows) < 2:
        return []
    views = ", ".join(f"{row['default_backend']} ({row['workers']})" for row in rows)
    detail = f"warning: live workers disagree about default_backend: {views}"
    return [CheckResult("workers", True, detail)]


async def _listen_result(conn: asyncpg.Connection, seconds: float) -> CheckResult:
    """A self-NOTIFY round trip: fails behind a transaction-pooling PgBouncer, which drops LISTEN."""
    channel = f"imagen_check_{uuid.uuid4().hex[:12]}"
    received: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def on_notify(_conn: object, _pid: int, _channel: str, payload: str) -> None:
        if not received.done():
            received.set_result(payload)

    try:
        await conn.add_listener(channel, on_notify)
        try:
            await conn.execute(sql("notify_probe"), channel)
            await asyncio.wait_for(received, timeout=min(seconds, 5.0))
        finally:
            await conn.remove_listener(channel, on_notify)
    except TimeoutError:
        return CheckResult(
            "listen/notify",
            False,
            "no notification came back: the worker needs a direct connection (no transaction pooler) "
            "for LISTEN; it would fall back to the poll interval",
        )
    except Exception as exc:
        return CheckResult("listen/notify", False, _error_text(exc))
    return CheckResult("listen/notify", True, "notifications arrive on this connection")


async def _backend_result(name: str, block: Mapping[str, Any], seconds: float) -> CheckResult:
    label = f"backend {name}"
    kind = block.get("type", "?")
    try:
        backend = backends.create(name, block)
    except ConfigError as exc:
        return CheckResult(label, False, str(exc))
    except Exception as exc:
        return CheckResult(label, False, f"cannot load type {kind!r}: {_error_text(exc)}")
    try:
        async with asyncio.timeout(seconds):
            await backend.start()
            health = await backend.health()
    except TimeoutError:
        return CheckResult(label, False, f"{kind}: no answer within {seconds:g}s")
    except Exception as exc:
        return CheckResult(label, False, f"{kind}: {_error_text(exc)}")
    finally:
        await _close_quietly(backend.aclose, seconds)
    detail = health.detail or ("healthy" if health.ok else "unhealthy")
    return CheckResult(label, health.ok, f"{kind}: {Redactor.from_env().scrub(detail)}")


async def _storage_result(config: Config, seconds: float) -> CheckResult:
    try:
        from imagen_worker.storage import create_sink, effective_cloud_sync
    except (ImportError, AttributeError):
        return CheckResult("storage", True, "storage check unavailable in this build", skipped=True)
    try:
        mode = effective_cloud_sync(config)
        sink = create_sink(config)
    except ConfigError as exc:
        return CheckResult("storage", False, str(exc))
    except Exception as exc:
        return CheckResult("storage", False, _error_text(exc))
    kind = sink.type_name
    try:
        async with asyncio.timeout(seconds):
            await sink.check()
    except TimeoutError:
        return CheckResult("storage", False, f"{kind}: no answer within {seconds:g}s")
    except Exception as exc:  # the line is the storage line already: no "storage: " twice
        return CheckResult("storage", False, f"{kind}: {_error_text(exc).removeprefix('storage: ')}")
    finally:
        await _close_quietly(sink.aclose, seconds)
    if sink.is_cloud:
        return CheckResult("storage", True, f"{kind}: credentials and bucket work (cloud sync {mode})")
    why = f"cloud sync {mode}"
    if mode == "auto" and config.storage.get("type") != kind:
        why += f": the {config.storage.get('type')} sink's credentials are not in the environment"
    return CheckResult("storage", True, f"{kind}: images stay on this machine ({why})")


def _webhooks_result(config: Config) -> CheckResult | None:
    """The signing secret a worker with a ``webhooks`` block refuses to start without."""
    from imagen_worker.webhooks.outbox import read_secret

    hooks = config.webhooks
    if hooks is None:
        return None
    try:
        read_secret(hooks)
    except ConfigError as exc:
        return CheckResult("webhooks", False, str(exc))
    events = ", ".join(str(event) for event in hooks.events)
    return CheckResult("webhooks", True, f"signed POSTs to {hooks.url.host} when jobs end ({events})")


async def _close_quietly(close: Callable[[], Awaitable[None]], seconds: float) -> None:
    try:
        async with asyncio.timeout(seconds):
            await close()
    except Exception:
        return


async def run_checks(
    config: Config | None,
    *,
    dsn: str | None,
    config_path: str | Path | None = None,
    check_timeout: float = 10.0,
) -> list[CheckResult]:
    """Check everything; the CLI exits non-zero when any result is not ``ok``.

    ``config=None`` loads it from ``config_path`` (or ``$IMAGEN_CONFIG``) and reports every
    problem. ``dsn=None`` falls back to the config's database URL; with neither, the
    database lines are skipped (``run`` would use the embedded server).
    """
    seconds = check_timeout
    shown = config_path
    if shown is None and config is not None and config.source_path not in (None, resolve_path(None)):
        shown = config.source_path  # a config loaded from a file that the default lookup would miss
    results = [_config_result(shown)]
    if config is None:
        config, _problems = collect_problems(config_path)
    if config is None:
        return [*results, *await _database_results(dsn, seconds)]

    results.append(_output_result(config.output.directory, config.output.min_free_mb))
    db_results, backend_results, storage_result = await asyncio.gather(
        _database_results(dsn or config.database_url(), seconds),
        asyncio.gather(*(_backend_result(n, b, seconds) for n, b in config.backend_blocks().items())),
        _storage_result(config, seconds),
    )
    webhooks = _webhooks_result(config)
    return [*results, *db_results, *backend_results, storage_result, *([webhooks] if webhooks else [])]


def render_table(results: list[CheckResult]) -> Table:
    """A rich table: one row per check, status first so failures stand out."""
    table = Table(title="imagen-worker check", show_lines=False)
    table.add_column("", no_wrap=True)
    table.add_column("check", no_wrap=True)
    table.add_column("detail", overflow="fold")
    for result in results:
        if result.skipped:
            mark = "[yellow]skip[/yellow]"
        elif result.ok:
            mark = "[green]ok[/green]"
        else:
            mark = "[bold red]FAIL[/bold red]"
        # Text, not markup: details quote errors like "[Errno 111]" that rich would eat as tags.
        table.add_row(mark, Text(result.name), Text(result.detail))
    return table
