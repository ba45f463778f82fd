"""Workers killed with SIGKILL while their ComfyUI prompts render: every job rendered exactly once.

A job's first prompt goes out with nothing written before its POST. The worker that takes the
job once the dead worker's lease expires finds that prompt by the job's id (queued, running or
finished) and collects it instead of rendering the job again.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from pathlib import Path

import asyncpg
import pytest

from tests.fakes.comfyui import FakeComfyUI
from tests.faults.gpu import GpuLedger, comfyui_block
from tests.faults.harness import FaultWorker, Fleet, running_on, settled
from tests.faults.ledger import assert_each_done_exactly_once
from tests.workers import eventually

pytestmark = pytest.mark.slow

KILLS = 2


async def test_kill_9_while_prompts_render_leaves_every_job_rendered_exactly_once(
    db: asyncpg.Pool, database_url: str, tmp_path: Path, fake_comfyui: FakeComfyUI
) -> None:
    gpu = GpuLedger(fake_comfyui, duration=0.4)
    block = comfyui_block(fake_comfyui)
    killed: list[tuple[uuid.UUID, str, float]] = []  # job, its prompt, when its worker died
    async with Fleet(database_url, tmp_path) as fleet:
        settings = {"poll_interval": 0.5, "concurrency": 2}
        workers = [fleet.add(f"w{i}", backends={"gpu": block}, worker=settings) for i in range(2)]
        await fleet.start(*workers)
        jobs = await gpu.insert(db, 16)
        loop = asyncio.get_running_loop()
        for _ in range(KILLS):
            # The live worker whose prompt is on the GPU right now dies with it in flight.
            job, prompt_id, victim = await eventually(
                functools.partial(_rendering, db, fake_comfyui, gpu, workers), within=30, every=0.02
            )
            assert victim.process is not None
            victim.process.kill()
            killed.append((job, prompt_id, loop.time()))
            await fake_comfyui.wait_until(functools.partial(_ended, fake_comfyui, prompt_id), within=15)
            await victim.start()
        await settled(db, jobs, within=60)

    await assert_each_done_exactly_once(db, gpu.executions(), jobs, attempts=(1, 2, 3))
    ends = {run.prompt_id: run.end for run in fake_comfyui.executions}
    mid_render = [job for job, prompt_id, at in killed if (ends[prompt_id] or 0) > at]
    assert mid_render, "a worker died while its prompt rendered"
    attempts = await db.fetch("SELECT attempts FROM imagen.jobs WHERE id = ANY($1::uuid[])", mid_render)
    assert all(row["attempts"] >= 2 for row in attempts), "each such job was taken over, not rerun"


async def _rendering(
    db: asyncpg.Pool, fake: FakeComfyUI, gpu: GpuLedger, workers: list[FaultWorker]
) -> tuple[uuid.UUID, str, FaultWorker] | None:
    """The prompt on the GPU, once it is a live worker's (not one a killed worker left behind)."""
    prompt_id = await fake.wait_running(within=15)
    job = gpu.jobs[gpu.tags[prompt_id]]
    for worker in workers:
        if worker.alive and job in await running_on(db, worker):
            return job, prompt_id, worker
    return None


def _ended(fake: FakeComfyUI, prompt_id: str) -> bool:
    return any(run.prompt_id == prompt_id and run.end is not None for run in fake.executions)
