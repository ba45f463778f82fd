"""ComfyUI down for longer than every retry of a job would take, then back on the same port.

A ComfyUI restart, a model reload or an out-of-memory crash takes the instance away for a
while. Jobs must wait for it instead of burning their attempts: every queued job (those queued
before the outage, the one rendering when it died, those queued during it) ends ``done``,
rendered once, with ``attempts`` still 1: attempts count failures of the job, not of the
infrastructure.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from tests.fakes.comfyui import FakeComfyUI
from tests.faults.gpu import GpuLedger, comfyui_block
from tests.faults.harness import Fleet, settled
from tests.faults.ledger import assert_each_done_exactly_once

pytestmark = pytest.mark.slow

CONNECT_TIMEOUT = 1.0
MAX_ATTEMPTS = 3
# Three attempts, each giving up after the connect timeout, with 0.05 s backoff between them:
# about 3.2 s. The outage lasts more than twice that.
DOWN = 7.0


async def test_a_backend_outage_longer_than_all_retries_fails_nothing(
    db: asyncpg.Pool, database_url: str, tmp_path: Path, fake_comfyui: FakeComfyUI
) -> None:
    gpu = GpuLedger(fake_comfyui, duration=0.5)
    block = comfyui_block(fake_comfyui, interrupt_grace=1.0, connect_timeout=CONNECT_TIMEOUT)
    async with Fleet(database_url, tmp_path) as fleet:
        settings = {"poll_interval": 0.5, "concurrency": 2, "max_attempts": MAX_ATTEMPTS}
        workers = [fleet.add(f"w{i}", backends={"gpu": block}, worker=settings) for i in range(2)]
        await fleet.start(*workers)
        before = await gpu.insert(db, 4)
        await fake_comfyui.wait_running(within=15)

        outage = asyncio.create_task(fake_comfyui.restart(down_for=DOWN))
        await asyncio.sleep(0.5)
        during = await gpu.insert(db, 4)
        await outage
        jobs = before + during
        await settled(db, jobs, within=40)

    lost = [run for run in fake_comfyui.executions if run.outcome == "lost"]
    assert lost, "the outage hit a job while it rendered"
    await assert_each_done_exactly_once(db, gpu.executions(), jobs, attempts=1)
