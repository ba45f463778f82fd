"""ComfyUI jobs through the real worker: progress, cancel, pools, lookahead, takeover."""

from __future__ import annotations

import statistics
import tempfile
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from imagen_worker.backends.comfyui import pool
from imagen_worker.backends.comfyui.failures import DISK_FULL
from imagen_worker.backends.comfyui.pool import first_prompt_id
from imagen_worker.queue.jobs import Queue
from tests.fakes.comfyui import FakeComfyUI, Plan
from tests.fakes.storage import FakeStorage
from tests.workers import eventually, image_row, insert_job, job_row, make_config, running_worker, terminal

OWNER = uuid.UUID("00000000-0000-4000-8000-000000000006")
FAST = {"poll_interval": 0.5, "interrupt_grace": 2.0, "connect_timeout": 2.0, "timeout": 30}


@pytest.fixture
def comfy(fake_comfyui: FakeComfyUI) -> FakeComfyUI:
    return fake_comfyui


def comfy_backend(*servers: FakeComfyUI, **extra: Any) -> dict[str, dict[str, Any]]:
    block = {"type": "comfyui", "urls": [s.url for s in servers], "workflow": "sd15", **FAST, **extra}
    return {"gpu": block}


async def insert(
    db: asyncpg.Pool, prompt: str, steps: int = 4, width: int = 512, height: int = 512
) -> uuid.UUID:
    return await insert_job(db, prompt, owner_user_id=OWNER, steps=steps, width=width, height=height)


async def test_a_comfyui_job_posts_under_its_first_prompt_id_reports_progress_and_ends_done(
    db: asyncpg.Pool, database_url: str, tmp_path: Path, comfy: FakeComfyUI
) -> None:
    comfy.default_duration = 2.5
    config = make_config(tmp_path, backends=comfy_backend(comfy))
    progress: list[dict[str, Any]] = []
    async with running_worker(config, database_url):
        job_id = await insert(db, "a koi pond", steps=10, width=512, height=768)

        async def finished() -> bool:
            row = await job_row(db, job_id)
            if row["progress"] and (not progress or progress[-1] != row["progress"]):
                progress.append(row["progress"])
            return bool(row["status"] == "done")

        await eventually(finished, within=15, every=0.05)
    job = await job_row(db, job_id)
    prompt_id = first_prompt_id(job_id)
    assert [r.body["prompt_id"] for r in comfy.calls("POST", "/prompt")] == [prompt_id]
    assert job["backend_ref"] is None, "a first claim writes nothing before its POST"
    assert len(progress) >= 2, "progress was written while ComfyUI worked"
    fractions = [p["fraction"] for p in progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    image = await image_row(db, job["image_id"])
    assert image["backend_metadata"]["prompt_id"] == prompt_id
    assert (image["width"], image["height"], image["mime_type"]) == (512, 768, "image/png")


async def test_cancelling_a_running_job_interrupts_exactly_its_prompt(
    db: asyncpg.Pool, database_url: str, tmp_path: Path, comfy: FakeComfyUI
) -> None:
    comfy.default_duration = 30
    config = make_config(tmp_path, backends=comfy_backend(comfy))
    async with running_worker(config, database_url):
        job_id = await insert(db, "a slow render")
        running = await comfy.wait_running(within=10)
        assert await Queue(db).request_cancel(job_id) == "running"
        job = await terminal(db, job_id, within=10)
    assert job["status"] == "cancelled"
    assert [i.prompt_id for i in comfy.interrupts] == [running], "a targeted interrupt, never a bare one"
    assert running == first_prompt_id(job_id)


async def test_two_instances_share_a_backlog(
    db: asyncpg.Pool, database_url: str, tmp_path: Path, comfy: FakeComfyUI
) -> None:
    async with FakeComfyUI() as second:
        comfy.default_duration = second.default_duration = 0.2
        config = make_config(tmp_path, backends=comfy_backend(comfy, second), worker={"concurrency": 8})
        async with running_worker(config, database_url):
            jobs = [await insert(db, f"tile {i}") for i in range(8)]
            rows = [await terminal(db, job_id, within=20) for job_id in jobs]
    assert all(row["status"] == "done" for row in rows)
    assert len(comfy.executions) >= 3 and len(second.executions) >= 3, "both GPUs took a share"


async def test_lookahead_keeps_the_gpu_busy_while_uploads_are_slow(
    db: asyncpg.Pool,
    database_url: str,
    tmp_path: Path,
    comfy: FakeComfyUI,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gpu_seconds, upload_seconds = 0.2, 0.15
    comfy.default_duration = gpu_seconds
    async with FakeStorage() as storage:
        storage.upload_latency = upload_seconds
        monkeypatch.setenv("SUPABASE_URL", storage.url)
        monkeypatch.setenv("SUPABASE_SERVICE_KEY", storage.service_key)
        config = make_config(
            tmp_path, backends=comfy_backend(comfy, lookahead=1), storage={"type": "supabase"}
        )
        async with running_worker(config, database_url):
            jobs = [await insert(db, f"frame {i}") for i in range(10)]
            rows = [await terminal(db, job_id, within=30) for job_id in jobs]
    assert all(row["status"] == "done" for row in rows)
    gaps = comfy.idle_gaps()
    assert len(gaps) == 9
    assert statistics.median(gaps) < upload_seconds / 3, (
        f"the next prompt starts while the previous result uploads (gaps: {gaps})"
    )
    first, last = comfy.busy_intervals()[0][0], comfy.busy_intervals()[-1][1]
    busy = sum(end - start for start, end in comfy.busy_intervals())
    assert busy / (last - first) > 0.8


async def test_a_taken_over_job_adopts_the_running_prompt_instead_of_resubmitting(
    db: asyncpg.Pool, database_url: str, tmp_path: Path, comfy: FakeComfyUI
) -> None:
    comfy.default_duration = 3.0
    config = make_config(tmp_path, backends=comfy_backend(comfy), worker={"lease_seconds": 3})
    async with running_worker(config, database_url) as first:
        job_id = await insert(db, "an adopted render")
        await comfy.wait_running(within=10)
        first.force.set()  # leave at once: the job is released, its prompt left running
    job = await job_row(db, job_id)
    assert job["status"] == "pending" and job["backend_ref"] is None
    async with running_worker(config, database_url):
        job = await terminal(db, job_id, within=15)
    assert job["status"] == "done"
    assert len(comfy.calls("POST", "/prompt")) == 1, "the second worker collected the same prompt"
    assert comfy.interrupts == [], "releasing a job does not interrupt its prompt"


async def test_a_job_whose_finished_prompt_cannot_be_collected_is_rendered_again_not_failed(
    db: asyncpg.Pool, database_url: str, tmp_path: Path, comfy: FakeComfyUI
) -> None:
    # Its outputs answer 404 (as after someone cleared ComfyUI's output folder) to the first
    # attempt and to the retry that adopts the same prompt; the retry then renders it anew.
    comfy.fail_next["/view"] = [404, 404]
    config = make_config(tmp_path, backends=comfy_backend(comfy))
    async with running_worker(config, database_url):
        job_id = await insert_job(db, "a second render", owner_user_id=OWNER, max_attempts=2)
        job = await terminal(db, job_id, within=15)
    assert job["status"] == "done", job["error"]
    assert job["attempts"] == 2
    prompts = [r.body["prompt_id"] for r in comfy.calls("POST", "/prompt")]
    assert prompts[0] == first_prompt_id(job_id) and len(prompts) == 2
    image = await image_row(db, job["image_id"])
    assert image["backend_metadata"]["prompt_id"] == prompts[1]


async def test_a_comfyui_job_with_n_4_in_jpeg_gives_four_rows_and_leaves_no_history_on_comfyui(
    db: asyncpg.Pool, database_url: str, tmp_path: Path, comfy: FakeComfyUI
) -> None:
    config = make_config(tmp_path, backends=comfy_backend(comfy))
    async with running_worker(config, database_url):
        job_id = await insert_job(
            db, "four koi", owner_user_id=OWNER, steps=2, width=64, height=64, n=4, format="jpeg", quality=80
        )
        job = await terminal(db, job_id, within=15)
    assert job["status"] == "done", job["error"]
    rows = await db.fetch("SELECT * FROM imagen.images WHERE job_id = $1 ORDER BY index", job_id)
    (posted,) = comfy.calls("POST", "/prompt")
    latent = next(n for n in posted.body["prompt"].values() if n["class_type"] == "EmptyLatentImage")
    assert latent["inputs"]["batch_size"] == 4
    assert [(r["index"], r["mime_type"], r["width"]) for r in rows] == [
        (i, "image/jpeg", 64) for i in range(4)
    ]
    assert job["image_id"] == rows[0]["id"]
    assert [r["sidecar"]["output"]["filename"] for r in rows] == sorted(
        r["sidecar"]["output"]["filename"] for r in rows
    )
    assert comfy.history_entry(posted.body["prompt_id"]) is None, "our history entry was deleted"
    spools = list(Path(tempfile.gettempdir()).glob("imagen-comfyui-*"))
    assert not [
        f for spool in spools for f in spool.iterdir() if f.stat().st_mtime >= job["started_at"].timestamp()
    ], "the downloads' temporary files are gone once written into place"


async def test_a_full_comfyui_disk_holds_the_jobs_instead_of_failing_them(
    db: asyncpg.Pool, database_url: str, tmp_path: Path, comfy: FakeComfyUI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pool, "HOLD_FIRST", 1.0)
    comfy.plan = lambda _pid, _graph: Plan.disk_full() if len(comfy.calls("POST", "/prompt")) == 1 else Plan()
    config = make_config(tmp_path, backends=comfy_backend(comfy), worker={"poll_interval": 0.2})
    async with running_worker(config, database_url):
        first = await insert_job(db, "saved once there is room", owner_user_id=OWNER, max_attempts=1)

        async def given_back() -> asyncpg.Record | None:
            row = await job_row(db, first)
            return row if row["outage_requeues"] == 1 else None

        held = await eventually(given_back, within=10)
        second = await insert_job(db, "queued during the pause", owner_user_id=OWNER, max_attempts=1)
        waiting = await eventually(lambda: _progress_message(db, second), within=5)
        done = [await terminal(db, job, within=15) for job in (first, second)]

    assert (held["status"], held["attempts"]) == ("pending", 0)
    assert held["error"] == (
        "ComfyUI cannot save images (No space left on device, in node 9 (SaveImage)); "
        "the job waits until it can"
    )
    assert waiting == DISK_FULL
    assert [(row["status"], row["attempts"]) for row in done] == [("done", 1), ("done", 1)]
    assert len(comfy.calls("POST", "/prompt")) == 3, "nothing was sent while the instance was held"


async def _progress_message(db: asyncpg.Pool, job_id: uuid.UUID) -> str | None:
    progress = (await job_row(db, job_id))["progress"] or {}
    return progress.get("message")
