"""``run_checks``: green against the real test database, one clear red line per real problem."""

from __future__ import annotations

import asyncio
import shutil
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

import asyncpg
import pytest
from rich.console import Console

from imagen_worker import backends
from imagen_worker.backends.base import Backend, GenerateRequest, GenerateResult, Health, JobContext
from imagen_worker.check import CheckResult, render_table, run_checks
from imagen_worker.config import Config, load_config
from imagen_worker.db import migrate as migrations
from imagen_worker.db.connect import describe_dsn
from imagen_worker.worker.disk import MIB, free_bytes


def _by_name(results: list[CheckResult]) -> dict[str, CheckResult]:
    return {r.name: r for r in results}


def _config(tmp_path: Path, **overrides: Any) -> Config:
    return load_config(output={"directory": str(tmp_path / "images")}, **overrides)


async def test_all_green_with_the_mock_backend(database_url: str, tmp_path: Path) -> None:
    results = await run_checks(_config(tmp_path), dsn=database_url)
    by_name = _by_name(results)
    assert list(by_name) == [
        "config",
        "output directory",
        "database",
        "migrations",
        "listen/notify",
        "backend mock",
        "storage",
    ]
    assert all(r.ok for r in results), results
    conn = await asyncpg.connect(database_url)
    try:
        version = (await conn.fetchval("SHOW server_version")).split(" ")[0]
    finally:
        await conn.close()
    # The server's own version string ("15.20"), not the driver's parse of it ("15.0").
    assert by_name["database"].detail.endswith(f"(PostgreSQL {version})")
    latest = migrations.discover()[-1].version
    assert by_name["migrations"].detail == f"up to date ({latest})"
    assert by_name["backend mock"].detail == "mock: healthy"
    assert by_name["storage"].detail.startswith("local: images stay on this machine")
    assert "(will be created)" in by_name["output directory"].detail
    assert by_name["output directory"].detail.endswith(" MiB free")


async def test_bad_dsn_is_one_clear_failing_line(tmp_path: Path) -> None:
    dsn = "postgresql://imagen:hunter2-pw@127.0.0.1:1/imagen"
    results = await run_checks(_config(tmp_path), dsn=dsn, check_timeout=3)
    failed = [r for r in results if not r.ok]
    assert [r.name for r in failed] == ["database"]
    assert failed[0].detail.startswith("cannot connect to 127.0.0.1:1/imagen: ")
    assert "hunter2" not in failed[0].detail
    assert "migrations" not in _by_name(results)


async def test_pending_newer_and_edited_migrations(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shipped = migrations.discover()
    folder = tmp_path / "migrations"
    folder.mkdir()
    monkeypatch.setattr(migrations, "migrations_dir", lambda: folder)

    for m in shipped:
        shutil.copy(m.path, folder / m.path.name)
    (folder / "9999_future.sql").write_text("SELECT 1;\n")
    row = _by_name(await run_checks(_config(tmp_path), dsn=database_url))["migrations"]
    # Pending is yellow, not red: a fresh database is checked before it is migrated.
    assert row.ok and row.skipped
    assert row.detail.startswith("1 pending (9999_future): run `imagen-worker migrate`")

    (folder / "9999_future.sql").unlink()
    (folder / shipped[-1].path.name).unlink()
    row = _by_name(await run_checks(_config(tmp_path), dsn=database_url))["migrations"]
    assert row.ok and f"the database also has newer {shipped[-1].version}" in row.detail

    (folder / shipped[0].path.name).write_text("-- edited after it was applied\n")
    row = _by_name(await run_checks(_config(tmp_path), dsn=database_url))["migrations"]
    assert not row.ok and "was changed after it was applied" in row.detail


class _FakeBackend(Backend):
    type_name = "fake"
    closed: list[str] = []

    def __init__(self, name: str, block: Mapping[str, Any]) -> None:
        super().__init__(name)
        self.block = block

    @classmethod
    def from_config(cls, name: str, block: Mapping[str, Any]) -> Self:
        return cls(name, block)

    async def health(self) -> Health:
        await asyncio.sleep(self.block.get("delay", 0))
        return Health(ok=self.block.get("ok", True), detail=self.block.get("detail", ""))

    async def aclose(self) -> None:
        _FakeBackend.closed.append(self.name)

    async def generate(self, request: GenerateRequest, ctx: JobContext) -> GenerateResult:
        raise NotImplementedError


async def test_backend_health_failures_and_timeouts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_create = backends.create

    def create(name: str, block: Mapping[str, Any]) -> Backend:
        return _FakeBackend.from_config(name, block) if block["type"] == "fake" else real_create(name, block)

    monkeypatch.setattr(backends, "create", create)
    _FakeBackend.closed.clear()
    config = _config(
        tmp_path,
        backends={
            "gpu": {
                "type": "fake",
                "ok": False,
                "detail": "ComfyUI at http://gpu:8188 refused the connection",
            },
            "slow": {"type": "fake", "delay": 5},
            "typo": {"type": "comfyuii"},
        },
    )
    by_name = _by_name(await run_checks(config, dsn=None, check_timeout=0.2))
    assert by_name["backend gpu"] == CheckResult(
        "backend gpu", False, "fake: ComfyUI at http://gpu:8188 refused the connection"
    )
    assert by_name["backend slow"] == CheckResult("backend slow", False, "fake: no answer within 0.2s")
    assert (
        not by_name["backend typo"].ok and "unknown backend type 'comfyuii'" in by_name["backend typo"].detail
    )
    assert sorted(_FakeBackend.closed) == ["gpu", "slow"]
    assert by_name["database"].skipped and by_name["database"].ok


async def test_storage_on_without_credentials_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEN_CLOUD_SYNC", "on")
    row = _by_name(await run_checks(_config(tmp_path), dsn=None))["storage"]
    assert not row.ok and "SUPABASE_URL" in row.detail


async def test_unreachable_storage_is_one_sentence_on_its_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("IMAGEN_CLOUD_SYNC", "on")
    monkeypatch.setenv("SUPABASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("SUPABASE_SERVICE_KEY", "sb_secret_" + "x" * 30)
    config = _config(tmp_path, storage={"type": "supabase", "max_retries": 0})

    row = _by_name(await run_checks(config, dsn=None))["storage"]

    assert row == CheckResult(
        "storage", False, f"supabase: cannot reach http://127.0.0.1:{port} (ConnectError, 1 attempt(s))"
    ), "no class name, no storage: twice"


async def test_invalid_config_file_is_reported_and_database_still_checked(
    database_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "imagen.yaml"
    path.write_text("worker:\n  concurrency: 0\nstorage:\n  type: supabase\n  key: inline-secret\n")
    results = await run_checks(None, dsn=database_url, config_path=path)
    by_name = _by_name(results)
    assert list(by_name) == ["config", "database", "migrations", "listen/notify"]
    assert not by_name["config"].ok
    assert "worker.concurrency" in by_name["config"].detail
    assert "storage.key: secrets must not be written in the config file" in by_name["config"].detail
    assert by_name["database"].ok


async def test_unwritable_output_directory(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    row = _by_name(await run_checks(load_config(output={"directory": str(blocker / "x")}), dsn=None))
    assert not row["output directory"].ok and "is not a directory" in row["output directory"].detail


async def test_less_free_space_than_the_floor_fails_the_output_directory(tmp_path: Path) -> None:
    floor = free_bytes(tmp_path) // MIB + 1024
    config = load_config(output={"directory": str(tmp_path / "images"), "min_free_mb": floor})
    row = _by_name(await run_checks(config, dsn=None))["output directory"]
    assert not row.ok
    assert row.detail.endswith(f"MiB free, below output.min_free_mb ({floor}): `run` would claim nothing")


def test_render_table_keeps_bracketed_text() -> None:
    console = Console(record=True, width=160, color_system=None)
    console.print(
        render_table(
            [
                CheckResult("database", False, "cannot connect: [Errno 111] Connect call failed"),
                CheckResult("storage", True, "local", skipped=True),
                CheckResult("config", True, "valid"),
            ]
        )
    )
    text = console.export_text()
    assert "[Errno 111]" in text
    assert "FAIL" in text and "skip" in text and "ok" in text


def test_describe_dsn_never_shows_the_password() -> None:
    assert describe_dsn("postgresql://u:pw@db.internal:6432/imagen") == "db.internal:6432/imagen"
    assert describe_dsn("host=/run/postgresql dbname=imagen password=x") == "the configured database"
    assert describe_dsn("postgresql://postgres:@/postgres?host=/home/me/pgdata") == "/home/me/pgdata/postgres"


async def test_live_workers_that_disagree_about_the_default_backend_are_a_warning(
    database_url: str, tmp_path: Path
) -> None:
    import uuid

    from imagen_worker.db.connect import connect
    from imagen_worker.queue.jobs import Queue

    conn = await connect(database_url)  # with the worker's JSON codecs, as the queue expects
    try:
        await conn.execute("DELETE FROM imagen.workers")
        await Queue(conn, uuid.uuid4()).register("a", 1, ["mock"], ttl=60, default_backend="mock")
        agreed = _by_name(await run_checks(_config(tmp_path), dsn=database_url))
        await Queue(conn, uuid.uuid4()).register("b", 2, ["sdxl"], ttl=60, default_backend="sdxl")
        await Queue(conn, uuid.uuid4()).register("c", 3, ["sdxl"], ttl=60, default_backend="sdxl")
        results = await run_checks(_config(tmp_path), dsn=database_url)
    finally:
        await conn.execute("DELETE FROM imagen.workers")
        await conn.close()
    assert "workers" not in agreed
    warning = _by_name(results)["workers"]
    assert (
        warning.ok
        and warning.detail == "warning: live workers disagree about default_backend: mock (1), sdxl (2)"
    )
