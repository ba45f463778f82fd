"""Live previews through the real worker: throttled into Storage, named in jobs.progress, removed
at the end unless kept; the mock reports the same progress shape as ComfyUI."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from imagen_worker.storage.supabase import SupabaseSink
from imagen_worker.worker.previews import Previews
from tests.fakes.comfyui import FakeComfyUI, Plan, latent_preview
from tests.fakes.storage import FakeStorage
from tests.workers import eventually, insert_job, job_row, make_config, running_worker, terminal

OWNER = uuid.UUID("00000000-0000-4000-8000-000000000077")
FAST = {"poll_interval": 0.5, "interrupt_grace": 2.0, "connect_timeout": 2.0, "timeout": 30}
STORAGE = {"type": "supabase", "max_retries": 0}
# ComfyUI started with --preview-method: each of the 3 steps (1.5 s each) sends a JPEG preview.
STEPS = 3


def step_preview(step: int) -> bytes:
    """What the fake's KSampler (sd15 template, 64x64) sends at ``step``."""
    graph = {
        "3": {"class_type": "KSampler", "inputs": {"latent_image": ["5", 0]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64}},
    }
    return latent_preview(graph, "3", step)


def backend(comfy: FakeComfyUI) -> dict[str, dict[str, Any]]:
    return {"gpu": {"type": "comfyui", "base_url": comfy.url, "workflow": "sd15", **FAST}}


async def run_preview_job(
    db: asyncpg.Pool,
    database_url: str,
    tmp_path: Path,
    comfy: FakeComfyUI,
    storage: FakeStorage,
    **output: Any,
) -> tuple[uuid.UUID, list[dict[str, Any]], asyncpg.Record]:
    comfy.plan = lambda pid, graph: Plan(duration=4.5)
    comfy.latent_previews = True
    output = {"directory": str(tmp_path / "images"), "cloud_sync": "off", **output}
    config = make_config(tmp_path, backends=backend(comfy), storage=STORAGE, output=output)
    seen: list[dict[str, Any]] = []
    async with running_worker(config, database_url):
        job_id = await insert_job(db, "previews", owner_user_id=OWNER, steps=STEPS, width=64, height=64)
        key = f"{OWNER}/{job_id}/preview.jpg"

        async def preview_while_running() -> bool:
            row = await job_row(db, job_id)
            if row["progress"] and row["status"] == "running":
                seen.append(row["progress"])
            return (
                row["status"] == "running"
                and storage.get(key) is not None
                and bool(row["progress"] and row["progress"].get("preview") == key)
            )

        await eventually(preview_while_running, within=10, every=0.05)
        job = await terminal(db, job_id, within=15)
    return job_id, seen, job


async def test_a_preview_is_uploaded_while_the_job_runs_and_deleted_when_it_ends(
    db: asyncpg.Pool, database_url: str, tmp_path: Path, fake_comfyui: FakeComfyUI, storage: FakeStorage
) -> None:
    job_id, seen, job = await run_preview_job(db, database_url, tmp_path, fake_comfyui, storage)
    key = f"{OWNER}/{job_id}/preview.jpg"

    assert job["status"] == "done", job["error"]
    assert seen[-1]["preview"] == key, seen[-1]
    assert 0 < seen[-1]["percent"] < 100
    # One upload per frame at most (they come 1.5 s apart, over the 1 s throttle), to one key.
    puts = [r for r in storage.requests if r.method in ("PUT", "POST") and "preview" in r.raw_path]
    assert 1 <= len(puts) <= STEPS and all(r.raw_path.endswith(key) for r in puts)
    assert storage.get(key) is None, "deleted when the job ended"
    assert [r for r in storage.requests if r.method == "DELETE" and r.raw_path.endswith(key)]
    final = job["progress"]
    assert final["percent"] == 100 and final["stage"] == "finished" and "preview" not in final
    assert not (tmp_path / "images" / str(OWNER) / str(job_id)).exists(), "no local preview left behind"


async def test_the_job_is_done_before_its_preview_is_deleted_so_a_slow_storage_delays_no_outcome(
    db: asyncpg.Pool, database_url: str, tmp_path: Path, fake_comfyui: FakeComfyUI, storage: FakeStorage
) -> None:
    storage.delete_latency = 2.0  # each delete answered 2 s late
    fake_comfyui.plan = lambda pid, graph: Plan(duration=3.0)
    fake_comfyui.latent_previews = True
    output = {"directory": str(tmp_path / "images"), "cloud_sync": "off"}
    config = make_config(tmp_path, backends=backend(fake_comfyui), storage=STORAGE, output=output)
    async with running_worker(config, database_url):
        job_id = await insert_job(db, "previews", owner_user_id=OWNER, steps=STEPS, width=64, height=64)
        key = f"{OWNER}/{job_id}/preview.jpg"
        await eventually(_exists(storage, key), within=10, every=0.05)
        job = await terminal(db, job_id, within=15)
        still_there_when_done = storage.get(key) is not None
    assert job["status"] == "done", job["error"]
    assert still_there_when_done, "done is written first; the delete follows"
    assert "preview" not in job["progress"], "the done row no longer names the preview"
    assert storage.get(key) is None, "deleted once the job was done"


async def test_keep_previews_leaves_the_last_frame_in_storage(
    db: asyncpg.Pool, database_url: str, tmp_path: Path, fake_comfyui: FakeComfyUI, storage: FakeStorage
) -> None:
    job_id, _, job = await run_preview_job(
        db, database_url, tmp_path, fake_comfyui, storage, keep_previews=True
    )
    key = f"{OWNER}/{job_id}/preview.jpg"

    assert job["status"] == "done", job["error"]
    stored = storage.get(key)
    # The last frame uploaded (the throttle may have skipped the very last step's).
    assert stored is not None and stored.content_type == "image/jpeg"
    assert stored.data in [step_preview(step) for step in range(1, STEPS + 1)]
    assert job["progress"]["preview"] == key


async def test_the_mock_reports_the_shape_a_web_page_reads(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    config = make_config(tmp_path, backends={"mock": {"type": "mock", "latency_ms": 2000}})
    seen: list[dict[str, Any]] = []
    async with running_worker(config, database_url):
        job_id = await insert_job(db, "a mock", owner_user_id=OWNER, steps=4, width=64, height=64)

        async def done() -> bool:
            row = await job_row(db, job_id)
            if row["progress"] and row["progress"] not in seen:
                seen.append(row["progress"])
            status: str = row["status"]
            return status == "done"

        await eventually(done, within=10, every=0.05)
    assert {"percent", "eta_seconds", "node", "stage", "message"} <= set(seen[0])
    assert seen[0]["stage"] == "sampling" and seen[0]["message"].startswith("step ")
    assert seen[-1]["percent"] == 100 and seen[-1]["eta_seconds"] == 0 and seen[-1]["stage"] == "finished"
    assert [p["percent"] for p in seen] == sorted(p["percent"] for p in seen)


async def test_previews_go_up_at_most_once_per_interval_and_the_latest_frame_wins(
    tmp_path: Path, storage: FakeStorage
) -> None:
    sink = SupabaseSink.from_config(STORAGE, output_directory=tmp_path)
    job_id = uuid.uuid4()
    keys: list[str] = []
    # A wide interval, so a loaded machine cannot let it pass before the check below.
    previews = Previews(sink, tmp_path, OWNER, job_id, min_interval=1.5, on_stored=keys.append)
    key = f"{OWNER}/{job_id}/preview.jpg"
    try:
        previews.offer(b"frame-1", "image/jpeg")
        await eventually(_holds(storage, key, b"frame-1"), within=2)
        for n in (2, 3, 4):
            previews.offer(f"frame-{n}".encode(), "image/jpeg")
        await asyncio.sleep(0.2)
        assert _stored(storage, key) == b"frame-1", "not before the interval passed"
        await eventually(_holds(storage, key, b"frame-4"), within=4)
        await eventually(_counted(previews, 2), within=2)  # the answer reaches the sink last
        assert keys == [key, key]
        previews.offer(b"gif?", "image/gif")  # not a preview format: ignored
        await previews.stop()
        await previews.discard()
    finally:
        await sink.aclose()
    assert storage.get(key) is None and list(tmp_path.iterdir()) == []


def _stored(storage: FakeStorage, key: str) -> bytes | None:
    blob = storage.get(key)
    return blob.data if blob is not None else None


def _exists(storage: FakeStorage, key: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return storage.get(key) is not None

    return check


def _counted(previews: Previews, uploads: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return previews.uploads == uploads

    return check


def _holds(storage: FakeStorage, key: str, data: bytes) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return _stored(storage, key) == data

    return check


async def test_with_local_storage_the_preview_is_a_file_under_the_output_directory(
    db: asyncpg.Pool, database_url: str, tmp_path: Path, fake_comfyui: FakeComfyUI
) -> None:
    fake_comfyui.plan = lambda pid, graph: Plan(duration=4.5)
    fake_comfyui.latent_previews = True
    config = make_config(tmp_path, backends=backend(fake_comfyui))  # cloud_sync off: local storage
    async with running_worker(config, database_url):
        job_id = await insert_job(db, "previews", owner_user_id=OWNER, steps=STEPS, width=64, height=64)
        key = f"{OWNER}/{job_id}/preview.jpg"
        path = tmp_path / "images" / key

        async def preview_file() -> bool:
            row = await job_row(db, job_id)
            return path.is_file() and bool(row["progress"] and row["progress"].get("preview") == key)

        await eventually(preview_file, within=10, every=0.05)
        assert path.read_bytes()[:2] == b"\xff\xd8", "ComfyUI's JPEG as it came"
        job = await terminal(db, job_id, within=15)
    assert job["status"] == "done", job["error"]
    assert not path.exists() and not (tmp_path / "images" / str(OWNER)).exists()


async def test_a_storage_outage_while_deleting_the_preview_does_not_hold_up_the_job(
    tmp_path: Path, storage: FakeStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("imagen_worker.worker.previews.DELETE_WITHIN", 0.3)
    sink = SupabaseSink.from_config(STORAGE, output_directory=tmp_path)
    job_id = uuid.uuid4()
    previews = Previews(sink, tmp_path, OWNER, job_id)
    key = f"{OWNER}/{job_id}/preview.jpg"
    # A Storage that accepts connections and never answers.
    silent = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    monkeypatch.setenv("SUPABASE_URL", f"http://127.0.0.1:{port}")
    hanging = SupabaseSink.from_config(STORAGE, output_directory=tmp_path)
    try:
        previews.offer(b"frame", "image/jpeg")
        await eventually(_holds(storage, key, b"frame"), within=2)
        previews.sink = hanging  # Storage stops answering before the job ends
        loop = asyncio.get_running_loop()
        started = loop.time()
        await previews.stop()
        await previews.discard()
        assert loop.time() - started < 1.0
    finally:
        await sink.aclose()
        await hanging.aclose()
        silent.close()
    assert storage.get(key) is not None, "left behind, and logged"


async def test_a_job_that_ran_before_deletes_the_previews_an_earlier_attempt_left(
    tmp_path: Path, storage: FakeStorage
) -> None:
    sink = SupabaseSink.from_config(STORAGE, output_directory=tmp_path)
    job_id = uuid.uuid4()
    left = {f"{OWNER}/{job_id}/preview.jpg": b"jpeg frame", f"{OWNER}/{job_id}/preview.png": b"png frame"}
    other = f"{OWNER}/{uuid.uuid4()}/preview.jpg"
    try:
        for key, data in {**left, other: b"another job's frame"}.items():  # attempts killed mid-render
            frame = tmp_path / "frame"
            frame.write_bytes(data)
            await sink.put(key, frame, "image/png" if key.endswith(".png") else "image/jpeg")
        first = Previews(sink, tmp_path, OWNER, job_id)
        await first.stop()
        await first.discard()
        assert all(storage.get(key) is not None for key in left), "a first attempt has nothing to sweep"

        retry = Previews(sink, tmp_path, OWNER, job_id, ran_before=True)
        await retry.stop()  # this attempt uploaded no preview of its own
        await retry.discard()
    finally:
        await sink.aclose()
    assert all(storage.get(key) is None for key in left)
    assert storage.get(other) is not None
