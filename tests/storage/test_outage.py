"""Waiting for Storage: a rendered image is uploaded once Storage takes it again, whether it was
down or answered but could not store (its disk full), while a refusal (a 4xx) fails at once."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from imagen_worker.errors import StorageUnavailable, TerminalError
from imagen_worker.storage import outage
from imagen_worker.storage.supabase import SupabaseSink
from tests.fakes.storage import FakeStorage

KEY = "00000000-0000-4000-8000-000000000001/00000000-0000-4000-8000-000000000002.png"
Make = Callable[..., SupabaseSink]


class Watched:
    """A job context and the worker's hooks, as the job's owner and the worker would see them."""

    def __init__(self) -> None:
        self.progress: list[dict[str, Any]] = []
        self.hooks: list[str] = []
        self.backend_ref: str | None = None
        self.first_claim = True
        self.cancel_requested = False

    async def set_backend_ref(self, ref: str) -> None:
        self.backend_ref = ref

    def report_progress(self, value: float, maximum: float, **extra: Any) -> None:
        self.progress.append({"value": value, "max": maximum, **extra})

    def report_preview(self, data: bytes, mime_type: str) -> None:
        return None

    def patience(self) -> outage.Patience:
        return outage.Patience(
            self,
            waiting=lambda: self.hooks.append("waiting"),
            resumed=lambda: self.hooks.append("resumed"),
            answered=lambda: self.hooks.append("answered"),
            first_pause=0.02,
            last_pause=0.05,
        )


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "render.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
    return path


async def test_an_upload_with_no_answer_for_a_while_says_the_job_waits_and_goes_on_when_it_lands(
    fake_storage: FakeStorage, make_sink: Make, image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outage, "SLOW_AFTER", 0.2)
    fake_storage.upload_latency = 1.0  # a Storage that takes its time to answer
    watched = Watched()

    stored = await outage.put(make_sink(max_retries=0), KEY, image, "image/png", watched.patience())

    assert stored.key == KEY and fake_storage.put_count(KEY) == 1
    assert [p["stage"] for p in watched.progress] == ["waiting_for_storage", "storage_back"]
    assert watched.progress[0]["message"] == outage.WAITING_MESSAGE
    assert watched.hooks == [], "a slow upload is not a wait that a stop may cut short"


async def test_a_storage_that_never_answers_says_so_before_the_sink_gives_up_and_then_waits(
    fake_storage: FakeStorage, make_sink: Make, image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outage, "SLOW_AFTER", 0.2)
    fake_storage.upload_latency = 3.0  # past the sink's timeout: no answer at all
    watched = Watched()
    upload = asyncio.create_task(
        outage.put(make_sink(max_retries=0, timeout=1.0), KEY, image, "image/png", watched.patience())
    )
    await asyncio.sleep(0.5)
    told_early = [p["stage"] for p in watched.progress]
    while "waiting" not in watched.hooks:  # the sink's timeout ran out: the job waits as in an outage
        await asyncio.sleep(0.01)
    fake_storage.upload_latency = 0.0

    stored = await asyncio.wait_for(upload, 10)

    assert told_early == ["waiting_for_storage"], "said within SLOW_AFTER, not after the sink's timeout"
    assert stored.key == KEY
    assert [p["stage"] for p in watched.progress] == ["waiting_for_storage", "storage_back"], "said once"
    assert watched.hooks == ["waiting", "answered", "resumed"]


async def test_an_upload_during_an_outage_waits_says_why_and_goes_ahead_once_storage_answers(
    fake_storage: FakeStorage, make_sink: Make, image: Path
) -> None:
    fake_storage.fail_next(10_000, status=503)  # every request
    watched = Watched()
    upload = asyncio.create_task(
        outage.put(make_sink(max_retries=0), KEY, image, "image/png", watched.patience())
    )
    while len([r for r in fake_storage.requests if r.method == "PUT"]) < 4:
        await asyncio.sleep(0.01)
    assert not upload.done(), "still waiting: no number of failed uploads gives up on the image"
    assert watched.hooks == ["waiting"]
    assert watched.progress[0]["stage"] == "waiting_for_storage"
    assert watched.progress[0]["message"] == outage.WAITING_MESSAGE

    fake_storage.recover()
    stored = await asyncio.wait_for(upload, 5)

    assert stored.key == KEY and fake_storage.put_count(KEY) == 1
    blob = fake_storage.get(KEY)
    assert blob is not None and blob.data == image.read_bytes()
    assert watched.hooks == ["waiting", "answered", "resumed"]
    assert [p["stage"] for p in watched.progress] == ["waiting_for_storage", "storage_back"]


async def test_an_upload_storage_cannot_store_while_it_answers_waits_too(
    fake_storage: FakeStorage, make_sink: Make, image: Path
) -> None:
    # Its own disk full: every upload answers 500 "ENOSPC" while reads of the bucket still work.
    fake_storage.fail_next(3, status="disk_full", methods=["PUT"])
    watched = Watched()
    stored = await outage.put(make_sink(max_retries=0), KEY, image, "image/png", watched.patience())
    assert stored.key == KEY and fake_storage.put_count(KEY) == 1
    assert [(r.method, r.status) for r in fake_storage.requests] == [("PUT", 500)] * 3 + [("PUT", 200)]
    assert watched.hooks == ["waiting", "answered", "resumed"]
    assert [p["stage"] for p in watched.progress] == ["waiting_for_storage", "storage_back"]


async def test_an_upload_storage_refuses_fails_at_once(
    fake_storage: FakeStorage, make_sink: Make, image: Path
) -> None:
    watched = Watched()
    with pytest.raises(TerminalError, match="Bucket not found"):
        await outage.put(
            make_sink(max_retries=0, bucket="missing"), KEY, image, "image/png", watched.patience()
        )
    assert watched.hooks == [] and watched.progress == []
    assert [r.method for r in fake_storage.requests] == ["PUT"]


async def test_without_patience_an_outage_fails_the_upload_as_before(
    fake_storage: FakeStorage, make_sink: Make, image: Path
) -> None:
    fake_storage.fail_next(10_000, status=503)
    with pytest.raises(StorageUnavailable, match="after 2 attempt"):
        await outage.put(make_sink(max_retries=1), KEY, image, "image/png", None)
    assert [r.method for r in fake_storage.requests] == ["PUT", "PUT"], "no wait"


async def test_an_input_image_read_during_an_outage_waits_at_0_percent_and_is_read_once_storage_answers(
    fake_storage: FakeStorage, make_sink: Make, image: Path
) -> None:
    await make_sink().put(KEY, image, "image/png")
    fake_storage.fail_next(10_000, status=503)
    watched = Watched()
    read = asyncio.create_task(outage.get(make_sink(max_retries=0), KEY, 1 << 20, watched.patience()))
    while len([r for r in fake_storage.requests if r.method == "GET"]) < 4:
        await asyncio.sleep(0.01)
    assert not read.done()
    fake_storage.recover()

    assert await asyncio.wait_for(read, 5) == image.read_bytes()
    assert watched.hooks == ["waiting", "answered"], "nothing was rendered: no upload to let finish"
    assert [(p["value"], p["stage"], p["message"]) for p in watched.progress] == [
        (0.0, "waiting_for_storage", outage.INPUT_WAITING_MESSAGE),
        (0.0, "storage_back", outage.INPUT_READ_MESSAGE),
    ]
