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
from tests.faults.gpu import GpuLedger
from tests.faults.harness import Fleet, running_on, settled
from tests.faults.ledger import assert_each_done_exactly_once

pytestmark = pytest.mark.slow

KILLS = 2


async def test_kill_9_while_prompts_render_leaves_every_job_rendered_exactly_once(
    db: asyncpg.Pool, database_url: str, tmp_path: Path, fake_comfyui: FakeComfyUI
) -> None:
    gpu = GpuLedger(fake_comfyui, duration=0.4)
    block = {
        "type": "comfyui", "base_url": fake_comfyui.url, "workflow": "sd15", "poll_interval": 0.5,
        "connect_timeout": 2.0, "timeout": 30,
    }  # fmt: skip
    taken_over: list[uuid.UUID] = []
    async with Fleet(database_url, tmp_path) as fleet:
        settings = {"poll_interval": 0.5, "concurrency": 2}
        workers = [fleet.add(f"w{i}", backends={"gpu": block}, worker=settings) for i in range(2)]
        await fleet.start(*workers)
        jobs = await gpu.insert(db, 16)
        for _ in range(KILLS):
            # The worker whose prompt is on the GPU right now dies with it in flight.
            prompt_id = await fake_comfyui.wait_running(within=15)
            rendering = gpu.jobs[gpu.tags[prompt_id]]
            [victim] = [w for w in workers if rendering in await running_on(db, w)]
            taken_over.append(rendering)
            assert victim.process is not None
            victim.process.kill()
            await fake_comfyui.wait_until(functools.partial(_ended, fake_comfyui, prompt_id), within=15)
            await victim.start()
            await asyncio.sleep(0.5)
        await settled(db, jobs, within=60)

    await assert_each_done_exactly_once(db, gpu.executions(), jobs, attempts=(1, 2, 3))
    attempts = await db.fetch("SELECT id, attempts FROM imagen.jobs WHERE id = ANY($1::uuid[])", taken_over)
    assert all(row["attempts"] >= 2 for row in attempts), "each killed job was taken over, not rerun"


def _ended(fake: FakeComfyUI, prompt_id: str) -> bool:
    return any(run.prompt_id == prompt_id and run.end is not None for run in fake.executions)
