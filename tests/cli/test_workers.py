"""``imagen workers``: an operator sees the fleet from one terminal, as the registry has it.

Real worker processes against the real database: each shows live with its jobs and backends,
draining after SIGTERM, silent and then lost after kill -9 (still holding its job until the
lease expires), a backend a worker takes no work for (its disk takes no files, its ComfyUI
does not answer) shows the worker's reason for the operator until the cause is gone, and jobs
that wait for Storage are counted under their worker.
"""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path

import asyncpg

from imagen_worker import __version__
from imagen_worker.cli import fleet
from imagen_worker.config import load_config
from tests.cli.test_imagen import run_imagen
from tests.fakes.comfyui import FakeComfyUI
from tests.fakes.storage import FakeStorage
from tests.workers import (
    eventually,
    insert_job,
    running_worker,
    terminal,
    wait_registered,
    worker_processes,
    write_config,
)


def line_of(listing: subprocess.CompletedProcess[str], pid: int) -> str:
    [line] = [line for line in listing.stdout.splitlines() if f"  {pid}  " in line]
    return line


async def test_each_worker_shows_live_draining_silent_then_lost_with_its_jobs_and_backends(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path,
        backends={"mock": {"type": "mock", "latency_ms": 60_000}, "spare": {"type": "mock"}},
        # Heartbeats every 2 s: silent from 4 s without one, lost at 12 s (2 x lease_seconds).
        worker={"lease_seconds": 6, "concurrency": 1, "shutdown_grace": 30},
        default_backend="mock",
    )
    with worker_processes(database_url, config, 2, tmp_path) as procs:
        await wait_registered(db, *procs)
        for n in range(2):
            await insert_job(db, f"a long render {n}")

        async def both_running() -> bool:
            return bool(await db.fetchval("SELECT count(*) = 2 FROM imagen.jobs WHERE status = 'running'"))

        await eventually(both_running, within=20)
        live = await run_imagen("workers", dsn=database_url, config=config)
        job = await db.fetchrow(
            "SELECT j.id, r.worker_id FROM imagen.jobs j JOIN imagen.job_runs r ON r.job_id = j.id"
        )
        status = await run_imagen("status", str(job["id"]), dsn=database_url, config=config)
        draining, killed = procs
        draining.signal(signal.SIGTERM)
        killed.kill()

        async def listing_says(pid: int, text: str) -> subprocess.CompletedProcess[str] | None:
            listing = await run_imagen("workers", dsn=database_url, config=config)
            return listing if text in line_of(listing, pid) else None

        drained = await eventually(lambda: listing_says(draining.pid, "draining"), within=10, every=0.2)
        silent = await eventually(lambda: listing_says(killed.pid, "silent"), within=15, every=0.2)
        lost = await eventually(lambda: listing_says(killed.pid, "lost"), within=20, every=0.2)

    assert live.returncode == 0, live.stderr
    header, *_, summary = live.stdout.splitlines()
    assert header.split() == ["worker", "host", "pid", "version", "state", "jobs", "backends"]
    for proc in procs:
        worker_id, _host, pid, version, state, _age, jobs, *backends = line_of(live, proc.pid).split()
        assert (pid, version, state, jobs) == (str(proc.pid), __version__, "live", "1")
        assert backends == ["mock*", "spare"], "the default backend first, marked"
        assert await db.fetchval("SELECT pid FROM imagen.workers WHERE id = $1::uuid", worker_id) == proc.pid
    assert summary == "2 live workers, 2 running jobs"
    runs_it = await db.fetchval("SELECT pid FROM imagen.workers WHERE id = $1", job["worker_id"])
    assert (
        f"worker        {job['worker_id']} ({socket.gethostname()}, pid {runs_it})"
        in status.stdout.splitlines()
    )
    assert line_of(drained, draining.pid).split()[4:6] == ["draining", "1"], "it still finishes its job"
    assert line_of(silent, killed.pid).split()[4] == "silent"
    assert silent.stdout.splitlines()[-1].endswith(
        "; 1 silent, still holding 1 job: another worker takes over once the lease expires"
    ), "a silent worker is not counted live"
    lost_line = line_of(lost, killed.pid).split()
    assert (lost_line[4], lost_line[6], lost_line[7]) == ("lost", "ago", "1"), "it holds its job"
    assert lost.stdout.splitlines()[-1] == (
        "1 live worker, 1 running job; "
        "1 lost, still holding 1 job: another worker takes over once the lease expires"
    )
    after = await run_imagen("workers", dsn=database_url, config=config)
    assert after.returncode == 1, "no live worker is left"
    assert "stopped" in line_of(after, draining.pid)


async def test_a_backend_that_takes_no_work_shows_why_under_its_worker_until_it_does(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    blocker = tmp_path / "disk"
    blocker.write_text("a file where the output directory's parent should be")
    config_path = write_config(tmp_path, output={"directory": str(blocker / "images")})
    config = load_config(config_path)

    async def listing_with(text: str, present: bool) -> subprocess.CompletedProcess[str] | None:
        listing = await run_imagen("workers", dsn=database_url, config=config_path)
        return listing if (text in listing.stdout) == present else None

    async with running_worker(config, database_url):
        job = await insert_job(db, "rendered, then nowhere to put it")  # its write finds the disk
        held = await eventually(lambda: listing_with("takes no work", True), within=10, every=0.2)
        blocker.unlink()  # the disk takes files again
        await eventually(lambda: listing_with("takes no work", False), within=10, every=0.2)
        finished = await terminal(db, job)  # claimed again at once: it may be running just now
        freed = await run_imagen("workers", dsn=database_url, config=config_path)

    reason = held.stdout.splitlines()[2].strip()
    assert reason.startswith(f"mock takes no work: output directory {blocker / 'images'} takes no files: ")
    assert "Not a directory" in reason, "the operator's reason, not the rows' public sentence"
    assert held.stdout.splitlines()[-1] == (
        "1 live worker, 0 running jobs; 1 with a backend that takes no work"
    )
    assert freed.stdout.splitlines()[-1] == "1 live worker, 0 running jobs"
    assert await db.fetchval("SELECT unavailable FROM imagen.workers") == {}
    assert finished["status"] == "done", "the job waited for the disk and then ran"


async def test_a_comfyui_that_stops_answering_is_named_under_its_worker_until_it_answers_again(
    db: asyncpg.Pool, database_url: str, tmp_path: Path, fake_comfyui: FakeComfyUI
) -> None:
    block = {"type": "comfyui", "base_url": fake_comfyui.url, "workflow": "sd15", "poll_interval": 0.5}
    config_path = write_config(tmp_path, backends={"gpu": block})

    async def listing_with(text: str, present: bool) -> subprocess.CompletedProcess[str] | None:
        listing = await run_imagen("workers", dsn=database_url, config=config_path)
        return listing if (text in listing.stdout) == present else None

    async with running_worker(load_config(config_path), database_url):
        await fake_comfyui.stop()
        down = await eventually(lambda: listing_with("takes no work", True), within=15, every=0.2)
        await fake_comfyui.start()  # the same port, as a restarted ComfyUI
        back = await eventually(lambda: listing_with("takes no work", False), within=15, every=0.2)

    reason = f"gpu takes no work: no ComfyUI instance answers: {fake_comfyui.url}"
    assert down.stdout.splitlines()[2].strip() == reason, "the operator's reason names the instance"
    assert back.stdout.splitlines()[-1] == "1 live worker, 0 running jobs"


async def test_jobs_that_wait_for_storage_are_counted_under_their_worker_until_it_takes_them(
    db: asyncpg.Pool, database_url: str, tmp_path: Path, storage: FakeStorage
) -> None:
    config_path = write_config(tmp_path, storage={"type": "supabase", "max_retries": 0})

    async def listing_with(text: str, present: bool) -> subprocess.CompletedProcess[str] | None:
        listing = await run_imagen("workers", dsn=database_url, config=config_path)
        return listing if (text in listing.stdout) == present else None

    async with running_worker(load_config(config_path), database_url):
        await storage.go_down()  # connections refused
        job = await insert_job(db, "rendered while Storage is down")
        waiting = await eventually(lambda: listing_with("waiting for Storage", True), within=15, every=0.2)
        await storage.come_back()
        finished = await terminal(db, job, within=15)
        after = await listing_with("waiting for Storage", False)

    assert waiting.stdout.splitlines()[2].strip() == "1 job rendered, waiting for Storage to take the images"
    assert waiting.stdout.splitlines()[-1] == "1 live worker, 1 running job; 1 waiting for Storage"
    assert finished["status"] == "done" and finished["attempts"] == 1
    assert after is not None, "nothing waits once Storage took the image"


def row(**fields: object) -> dict[str, object]:
    base = {"live": True, "stopped": False, "heartbeat_seconds": 1.0, "ttl_seconds": 12.0, "running": 0,
            "unavailable": {}, "storage_waits": 0}  # fmt: skip
    return {**base, **fields}


def test_the_summary_counts_only_answering_workers_live_and_names_jobs_only_when_held() -> None:
    rows = [
        row(running=2),
        row(heartbeat_seconds=30.0, running=1),  # silent: two heartbeats missed
        row(live=False, heartbeat_seconds=90.0),  # lost, holding nothing
    ]

    assert fleet.summary(rows) == (
        "1 live worker, 2 running jobs; 1 silent, still holding 1 job: another worker takes over once "
        "the lease expires; 1 lost"
    )
    assert [fleet.answering(r) for r in rows] == [True, False, False]
