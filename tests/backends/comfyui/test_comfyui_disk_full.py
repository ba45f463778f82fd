"""A ComfyUI whose disk is full fails every save the same way: the job is given back, not failed,
and the instance takes no prompts for a while instead of burning through the queue."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from imagen_worker.backends.comfyui import pool
from imagen_worker.backends.comfyui.failures import DISK_FULL, ServerDiskFull
from imagen_worker.errors import BackendUnavailable
from tests.backends.comfyui.conftest import BackendFactory
from tests.backends.comfyui.support import RecordingContext, make_request
from tests.fakes.comfyui import FakeComfyUI, Plan


def disk_full_for(prompts: int) -> Any:
    """A plan: the first ``prompts`` prompts fail to save, the rest succeed."""
    seen: list[str] = []

    def plan(prompt_id: str, _graph: dict[str, Any]) -> Plan:
        seen.append(prompt_id)
        return Plan.disk_full() if len(seen) <= prompts else Plan()

    return plan


@pytest.fixture
def short_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool, "HOLD_FIRST", 0.3)
    monkeypatch.setattr(pool, "HOLD_MAX", 0.5)


async def test_a_save_on_a_full_disk_gives_the_job_back_and_holds_the_instance_until_the_pause_ends(
    fake: FakeComfyUI, make_backend: BackendFactory, short_holds: None
) -> None:
    fake.plan = disk_full_for(1)
    backend = await make_backend(fake)
    changes: list[str | None] = []
    backend.watch(lambda: changes.append(backend.unavailable_reason))

    with pytest.raises(ServerDiskFull) as caught:
        await backend.generate(make_request(), RecordingContext())

    assert isinstance(caught.value, BackendUnavailable), "the job goes back without spending an attempt"
    assert caught.value.message == (
        "ComfyUI cannot save images (No space left on device, in node 9 (SaveImage)); "
        "the job waits until it can"
    )
    assert caught.value.detail["exception_type"] == "OSError"
    assert (backend.unavailable_reason, backend.capacity) == (DISK_FULL, 0)
    assert (
        backend.unavailable_detail
        == f"ComfyUI cannot save images (a full, over-quota or read-only disk): {fake.url}"
    )
    assert changes == [DISK_FULL], "the worker is told at once, so it stops claiming"

    await asyncio.sleep(0.4)
    assert (backend.unavailable_reason, changes[-1]) == (None, None), "the pause's end wakes the worker"
    assert backend.unavailable_detail is None
    assert backend.capacity > 0
    result = await backend.generate(make_request(), RecordingContext())
    assert result.image.data[:8] == b"\x89PNG\r\n\x1a\n"


async def test_the_pause_doubles_while_the_disk_stays_full_and_a_saved_image_resets_it(
    fake: FakeComfyUI, make_backend: BackendFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pool, "HOLD_FIRST", 0.1)
    monkeypatch.setattr(pool, "HOLD_MAX", 0.25)
    fake.plan = disk_full_for(3)
    backend = await make_backend(fake)
    instance = backend._instances[0]
    held: list[float] = []
    for _ in range(3):
        with pytest.raises(ServerDiskFull):
            await backend.generate(make_request(), RecordingContext())
        held.append(instance.held_until - asyncio.get_running_loop().time())
        await asyncio.sleep(held[-1] + 0.05)

    await backend.generate(make_request(), RecordingContext())

    assert held == pytest.approx([0.1, 0.2, 0.25], abs=0.03), "doubling, then capped at HOLD_MAX"
    assert instance.holds == 0, "a saved image ends the run of pauses"


async def test_other_errors_on_a_save_stay_the_jobs_own(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    fake.plan = lambda _pid, _graph: Plan(
        outcome="error", exception_type="OSError", exception_message="[Errno 36] File name too long"
    )
    backend = await make_backend(fake)

    with pytest.raises(Exception) as caught:
        await backend.generate(make_request(), RecordingContext())

    assert not isinstance(caught.value, BackendUnavailable)
    assert backend.unavailable_reason is None
