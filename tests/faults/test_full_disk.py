"""One worker's disk fills up: it claims nothing until it has room, and the fleet loses no job.

The full worker is a real ``imagen-worker run`` in a mount namespace of its own, whose output
directory is a 1 MiB tmpfs filled to the brim (``unshare``, no root needed beyond user
namespaces): its writes meet ENOSPC from the kernel, not a simulation. The test reaches into
that filesystem through ``/proc/<pid>/root`` to free the space.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from imagen_worker.worker.disk import HELD
from tests.workers import (
    WorkerProcess,
    eventually,
    insert_job,
    job_row,
    on_a_full_disk,
    terminal,
    wait_registered,
    write_config,
)

pytestmark = pytest.mark.slow


def _namespaces_allowed() -> bool:
    unshare = shutil.which("unshare")
    return unshare is not None and subprocess.run([unshare, "-rm", "true"], check=False).returncode == 0


def _config(directory: Path, worker: dict[str, Any], output: dict[str, Any]) -> Path:
    directory.mkdir()
    return write_config(directory, worker=worker, output=output)


async def _worker_of(db: asyncpg.Pool, proc: WorkerProcess) -> object:
    return await db.fetchval("SELECT id FROM imagen.workers WHERE pid = $1", proc.pid)


@pytest.mark.skipif(not _namespaces_allowed(), reason="this machine allows no user and mount namespaces")
async def test_a_full_disk_holds_its_worker_and_another_worker_runs_every_job_once(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    settings = {"poll_interval": 0.5, "concurrency": 2}
    mount = tmp_path / "full-disk"
    mount.mkdir()
    full_config = _config(tmp_path / "full", settings, {"directory": str(mount), "min_free_mb": 0})
    roomy_config = _config(tmp_path / "roomy", settings, {})
    prefix = on_a_full_disk(mount, "1m")
    full = WorkerProcess(database_url, full_config, tmp_path / "full.log", prefix=prefix)
    roomy: WorkerProcess | None = None
    try:
        await wait_registered(db, full)
        jobs = [await insert_job(db, f"fox {i}", max_attempts=1) for i in range(6)]

        async def held() -> bool:
            row = await job_row(db, jobs[0])
            return row["progress"] is not None and row["progress"].get("message") == HELD

        await eventually(held, within=15)
        await asyncio.sleep(1.5)  # still full: the worker claims nothing more
        while_full = [await job_row(db, job) for job in jobs]

        roomy = WorkerProcess(database_url, roomy_config, tmp_path / "roomy.log")
        await wait_registered(db, roomy)
        roomy_id = await _worker_of(db, roomy)
        done = [await terminal(db, job, within=20) for job in jobs]
        await roomy.terminate()

        (Path(f"/proc/{full.pid}/root") / str(mount).lstrip("/") / "filler").unlink()
        later = await insert_job(db, "after the clean-up", max_attempts=1)
        after = await terminal(db, later, within=15)
        full_id = await _worker_of(db, full)
        full_log = (tmp_path / "full.log").read_text()
    finally:
        full.stop()
        if roomy is not None:
            roomy.stop()

    first = while_full[0]
    assert first["status"] == "pending" and first["attempts"] == 0 and first["outage_requeues"] >= 1
    assert first["error"] == "could not write the image to the output directory (No space left on device)"
    assert all(row["status"] == "pending" and row["attempts"] == 0 for row in while_full)
    assert sum(row["outage_requeues"] for row in while_full) <= 2, (
        "at most one job per slot met the full disk"
    )
    assert [(row["status"], row["attempts"]) for row in done] == [("done", 1)] * len(jobs)
    assert {row["worker_id"] for row in done} == {roomy_id}
    assert (after["status"], after["attempts"], after["worker_id"]) == ("done", 1, full_id)
    assert "output directory cannot take a job's files" in full_log
    assert "output directory takes files again" in full_log
