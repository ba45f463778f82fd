"""The ``imagen`` CLI, run as a user runs it, against the real database and a real worker."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from pathlib import Path

import asyncpg

from tests.workers import BIN, wait_registered, worker_env, worker_processes, write_config


def imagen(*args: str, dsn: str, config: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "imagen"), *args], env=worker_env(dsn, config), capture_output=True, text=True,
        timeout=timeout, check=False,
    )  # fmt: skip


async def run_imagen(*args: str, dsn: str, config: Path) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(imagen, *args, dsn=dsn, config=config)


async def test_submit_prints_the_job_id_and_status_list_cancel_retry_manage_it(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    config = write_config(tmp_path)
    submitted = await run_imagen(
        "submit", "a quiet harbour", "--size", "512x384", "--param", "mock_fail=terminal", "--priority", "5",
        dsn=database_url, config=config,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    job_id = uuid.UUID(submitted.stdout.strip())
    row = await db.fetchrow("SELECT * FROM imagen.jobs WHERE id = $1", job_id)
    assert (row["width"], row["height"], row["priority"]) == (512, 384, 5)
    assert row["params"] == {"mock_fail": "terminal"}

    status = await run_imagen("status", str(job_id), dsn=database_url, config=config)
    assert status.returncode == 0 and "pending" in status.stdout and "a quiet harbour" in status.stdout
    listed = await run_imagen("list", "--status", "pending", dsn=database_url, config=config)
    assert str(job_id) in listed.stdout

    cancelled = await run_imagen("cancel", str(job_id), dsn=database_url, config=config)
    assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout
    again = await run_imagen("cancel", str(job_id), dsn=database_url, config=config)
    assert again.returncode == 1 and again.stderr == f"job {job_id} is cancelled; nothing to cancel\n"
    retried = await run_imagen("retry", str(job_id), dsn=database_url, config=config)
    assert retried.returncode == 0
    assert await db.fetchval("SELECT status FROM imagen.jobs WHERE id = $1", job_id) == "pending"
    nobody = uuid.uuid4()
    for command in ("cancel", "retry"):
        missing = await run_imagen(command, str(nobody), dsn=database_url, config=config)
        assert (missing.returncode, missing.stderr) == (1, f"no job {nobody}\n")


async def test_submit_wait_ends_with_the_image_path_or_the_jobs_error(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    config = write_config(tmp_path, backends={"mock": {"type": "mock", "latency_ms": 1500}})
    with worker_processes(database_url, config, 1, tmp_path) as procs:
        await wait_registered(db, *procs)
        ok, bad = await asyncio.gather(
            run_imagen("submit", "a lantern", "--size", "256x256", "--steps", "6", "--wait",
                       dsn=database_url, config=config),
            run_imagen("submit", "doomed", "--param", "mock_fail=terminal", "--wait",
                       dsn=database_url, config=config),
        )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    image = Path(ok.stdout.strip())
    assert image.is_file() and image.read_bytes().startswith(b"\x89PNG")
    assert bad.returncode == 1
    assert "failed" in bad.stderr and "simulated bad request" in bad.stderr


async def test_progress_of_a_running_job_reaches_the_row(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    config = write_config(tmp_path, backends={"mock": {"type": "mock", "latency_ms": 3000}})
    with worker_processes(database_url, config, 1, tmp_path) as procs:
        await wait_registered(db, *procs)
        submitted = await run_imagen("submit", "slow", "--steps", "30", dsn=database_url, config=config)
        job_id = uuid.UUID(submitted.stdout.strip())
        seen: list[float] = []
        for _ in range(60):  # every 0.1 s while the job runs (a 3 s render), at most 6 s
            row = await db.fetchrow("SELECT status, progress FROM imagen.jobs WHERE id = $1", job_id)
            if row["progress"]:
                seen.append(row["progress"]["fraction"])
            if row["status"] in ("done", "failed", "cancelled"):
                break
            await asyncio.sleep(0.1)
    assert seen, "progress was written while the job ran"
    assert seen == sorted(seen) and 0 < seen[0] < 1
    assert len(set(seen)) <= 6, "progress writes are throttled to about one per second"


def test_generate_runs_in_process_and_prints_only_the_image_path(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    result = imagen("generate", "a paper boat", "--size", "128x128", "--seed", "5", dsn="", config=config)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].endswith("-a-paper-boat-5.png")
    assert Path(lines[0]).is_file() and Path(lines[0] + ".json").is_file()


def test_generate_with_bad_input_fails_in_words(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    result = imagen("generate", "x", "--size", "banana", dsn="", config=config)
    assert result.returncode == 64  # EX_USAGE
    assert "--size 'banana': expected WIDTHxHEIGHT" in result.stderr


def test_styles_and_backends_are_listed(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    styles = imagen("styles", dsn="", config=config)
    assert styles.returncode == 0 and "watercolor" in styles.stdout
    backends = imagen("backends", dsn="", config=config)
    assert backends.returncode == 0 and "mock" in backends.stdout and "yes" in backends.stdout


async def test_submit_n_4_webp_wait_prints_four_paths_and_status_shows_all_four(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    config = write_config(tmp_path)
    with worker_processes(database_url, config, 1, tmp_path) as procs:
        await wait_registered(db, *procs)
        done = await run_imagen(
            "submit", "four lanterns", "--size", "128x128", "-n", "4", "--format", "webp", "--quality", "70",
            "--wait", dsn=database_url, config=config,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    paths = [Path(line) for line in done.stdout.splitlines()]
    assert len(paths) == 4 and all(p.suffix == ".webp" and p.read_bytes()[8:12] == b"WEBP" for p in paths)
    job = await db.fetchrow("SELECT id, owner_user_id FROM imagen.jobs WHERE prompt = 'four lanterns'")
    job_id = job["id"]

    status = await run_imagen("status", str(job_id), dsn=database_url, config=config)
    lines = dict(line.split(None, 1) for line in status.stdout.splitlines() if " " in line)
    assert lines["images"] == "4"
    assert [lines[f"local_path{at}"] for at in ("", ".1", ".2", ".3")] == [str(p) for p in paths]
    assert lines["thumbnail.3"] == f"local:{job['owner_user_id']}/{job_id}/3.thumb.webp"

    refused = await run_imagen("submit", "x", "-n", "17", dsn=database_url, config=config)
    assert refused.returncode == 64 and "'-n' / '--count'" in refused.stderr and "16" in refused.stderr
