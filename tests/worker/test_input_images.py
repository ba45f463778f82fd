"""Input images through the real worker: from the owner's Storage folder to ComfyUI's LoadImage."""

from __future__ import annotations

import asyncio
import io
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
from PIL import Image

from imagen_worker.storage import outage
from imagen_worker.storage.supabase import SupabaseSink
from imagen_worker.worker import fleet
from tests.fakes.comfyui import FakeComfyUI, Plan
from tests.fakes.storage import FakeStorage
from tests.workers import (
    eventually,
    insert_job,
    job_row,
    make_config,
    running_worker,
    terminal,
    waiting_for_storage,
)

OWNER = uuid.UUID("00000000-0000-4000-8000-000000000009")
FAST = {"poll_interval": 0.5, "interrupt_grace": 2.0, "connect_timeout": 2.0, "timeout": 30}


def png(width: int, height: int, rgb: tuple[int, int, int] = (90, 120, 200)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), rgb).save(out, "PNG")
    return out.getvalue()


async def upload(storage: FakeStorage, tmp_path: Path, key: str, data: bytes) -> None:
    """What ``imagen submit --image`` does: the file into the owner's folder, under its key."""
    source = tmp_path / uuid.uuid4().hex
    source.write_bytes(data)
    sink = SupabaseSink(url=storage.url, key=storage.service_key)
    try:
        await sink.put_exact(key, source, "image/png")
    finally:
        await sink.aclose()


def img2img(comfy: FakeComfyUI, tmp_path: Path, workflow: str = "sd15-img2img") -> Any:
    block = {"type": "comfyui", "urls": [comfy.url], "workflow": workflow, **FAST}
    return make_config(tmp_path, backends={"gpu": block}, storage={"type": "supabase"})


async def insert(db: asyncpg.Pool, images: dict[str, str], **params: Any) -> uuid.UUID:
    return await insert_job(
        db,
        "a watercolour version",
        owner_user_id=OWNER,
        steps=4,
        params={"images": images, **params},
    )


async def test_an_img2img_job_loads_the_owners_image_in_its_own_comfyui_folder(
    db: asyncpg.Pool, database_url: str, tmp_path: Path, fake_comfyui: FakeComfyUI, storage: FakeStorage
) -> None:
    key = f"{OWNER}/uploads/cat.png"
    data = png(96, 64)
    await upload(storage, tmp_path, key, data)
    async with running_worker(img2img(fake_comfyui, tmp_path), database_url):
        job_id = await insert(db, {"init": key}, denoise=0.6)
        job = await terminal(db, job_id, within=15)

    assert job["status"] == "done", job["error"]
    assert fake_comfyui.files[("input", f"imagen/{job_id}", "init.png")] == data
    graph = fake_comfyui.calls("POST", "/prompt")[0].body["prompt"]
    assert graph["10"]["inputs"]["image"] == f"imagen/{job_id}/init.png"
    assert graph["3"]["inputs"]["denoise"] == 0.6
    image = await db.fetchrow("SELECT sidecar FROM imagen.images WHERE id = $1", job["image_id"])
    assert image["sidecar"]["params"]["images"] == {"init": key}


async def test_a_missing_input_fails_the_job_in_one_sentence_before_comfyui(
    db: asyncpg.Pool, database_url: str, tmp_path: Path, fake_comfyui: FakeComfyUI, storage: FakeStorage
) -> None:
    key = f"{OWNER}/uploads/never-uploaded.png"
    async with running_worker(img2img(fake_comfyui, tmp_path), database_url):
        job_id = await insert(db, {"init": key})
        job = await terminal(db, job_id, within=15)

    assert job["status"] == "failed"
    assert job["error"] == f"input image init ({key}) was not found in storage; upload it first"
    assert job["attempts"] == 1, "a missing file is not retried"
    assert fake_comfyui.calls("POST", "/upload/image") == []
    assert fake_comfyui.calls("POST", "/prompt") == []


async def test_a_storage_outage_while_reading_the_input_makes_the_job_wait_not_spend_its_attempts(
    db: asyncpg.Pool, database_url: str, tmp_path: Path, fake_comfyui: FakeComfyUI, storage: FakeStorage
) -> None:
    key = f"{OWNER}/uploads/fox.png"
    await upload(storage, tmp_path, key, png(64, 64))
    storage.fail_next(100_000, status=503)
    fake_comfyui.plan = lambda pid, graph: Plan(duration=2.0)
    block = {"type": "comfyui", "urls": [fake_comfyui.url], "workflow": "sd15-img2img", **FAST}
    storage_block = {"type": "supabase", "max_retries": 0}
    # One slot: while the job waits for its input, Storage holds the backend.
    config = make_config(tmp_path, backends={"gpu": block}, storage=storage_block, worker={"concurrency": 1})
    async with running_worker(config, database_url) as worker:
        job_id = await insert(db, {"init": key})
        await eventually(lambda: waiting_for_storage(db, job_id))
        await asyncio.sleep(1.0)  # retry_base_seconds 0.05: the attempts would long be spent
        row = await job_row(db, job_id)
        assert row["status"] == "running" and row["attempts"] == 1 and row["error"] is None
        assert row["progress"]["percent"] == 0 and row["progress"]["message"] == outage.INPUT_WAITING_MESSAGE
        assert fake_comfyui.calls("POST", "/prompt") == [], "nothing renders without its input"
        held_while_waiting = worker.fleet.unavailable_reason("gpu")

        storage.recover()
        await eventually(_posted(fake_comfyui), within=10)
        held_while_rendering = worker.fleet.unavailable_reason("gpu")
        job = await terminal(db, job_id, within=20)
    assert job["status"] == "done" and job["attempts"] == 1, job["error"]
    assert len(fake_comfyui.calls("POST", "/prompt")) == 1
    assert held_while_waiting == fleet.STORAGE_HELD
    assert held_while_rendering is None, "read at last, the input waits for nothing: the slot renders"


def _posted(comfy: FakeComfyUI) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return bool(comfy.calls("POST", "/prompt"))

    return check


async def test_an_inpaint_job_sends_image_and_mask_and_each_job_keeps_its_own(
    db: asyncpg.Pool, database_url: str, tmp_path: Path, fake_comfyui: FakeComfyUI, storage: FakeStorage
) -> None:
    init, mask = f"{OWNER}/uploads/room.png", f"{OWNER}/uploads/room-mask.png"
    await upload(storage, tmp_path, init, png(64, 64))
    await upload(storage, tmp_path, mask, png(64, 64, (255, 255, 255)))
    async with running_worker(img2img(fake_comfyui, tmp_path, "sd15-inpaint"), database_url):
        jobs = [await insert(db, {"init": init, "mask": mask}) for _ in range(2)]
        rows = [await terminal(db, job_id, within=15) for job_id in jobs]

    assert [row["status"] for row in rows] == ["done", "done"], [row["error"] for row in rows]
    for job_id in jobs:
        assert ("input", f"imagen/{job_id}", "init.png") in fake_comfyui.files
        assert ("input", f"imagen/{job_id}", "mask.png") in fake_comfyui.files
