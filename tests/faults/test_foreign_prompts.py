"""A shared ComfyUI kept busy by someone else's prompts for longer than our job timeout.

Prompts queued directly in ComfyUI (as a person using its web UI would, with their own
``client_id``) keep it busy for 7.5 s; our backend's ``timeout`` is 3 s. The timeout is for
our own render, not for waiting behind other people's work: our jobs wait, then run, each once,
none failed, no attempt spent.
"""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest

from tests.fakes.comfyui import FakeComfyUI
from tests.faults.gpu import GpuLedger
from tests.faults.harness import Fleet, settled
from tests.faults.ledger import assert_each_done_exactly_once

pytestmark = pytest.mark.slow


TIMEOUT = 3.0
FOREIGN = 2.5  # each of three foreign prompts


async def test_foreign_prompts_longer_than_the_timeout_only_delay_our_jobs(
    db: asyncpg.Pool, database_url: str, tmp_path: Path, fake_comfyui: FakeComfyUI
) -> None:
    gpu = GpuLedger(fake_comfyui, duration=0.4, foreign_duration=FOREIGN)
    block = {
        "type": "comfyui", "base_url": fake_comfyui.url, "workflow": "sd15", "poll_interval": 0.5,
        "interrupt_grace": 1.0, "connect_timeout": 1.0, "timeout": TIMEOUT,
    }  # fmt: skip
    async with Fleet(database_url, tmp_path) as fleet:
        worker = fleet.add("worker", backends={"gpu": block}, worker={"poll_interval": 0.5, "concurrency": 2})
        await worker.start()
        for _ in range(3):
            await fake_comfyui.submit_foreign(FOREIGN, client_id="someone-at-the-ui")
        await fake_comfyui.wait_running(within=5)
        jobs = await gpu.insert(db, 3)
        await settled(db, jobs, within=40)

    foreign = gpu.foreign_busy()
    assert len(foreign) == 3 and all(end is not None for _, end in foreign)
    foreign_end = max(end for _, end in foreign if end is not None)
    assert foreign_end - min(start for start, _ in foreign) > TIMEOUT, "busy for longer than the timeout"
    runs = await assert_each_done_exactly_once(db, gpu.executions(), jobs, attempts=1)
    assert all(run.start >= foreign_end for run in runs), "our jobs waited for the foreign work"
