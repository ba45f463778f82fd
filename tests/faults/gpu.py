"""The fake ComfyUI's GPU as an execution ledger: which of our jobs ran when, and how it ended.

Job prompts carry a ``[job:N]`` tag; the fake's ``plan`` hook (called as each prompt starts
executing) reads it, so every busy interval of the fake GPU is attributed to a job (or to a
foreign prompt, which carries none).
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import asyncpg

from tests.fakes.comfyui import FakeComfyUI, Plan
from tests.faults.harness import OWNER
from tests.faults.ledger import Execution

_TAG = re.compile(r"\[job:(\d+)\]")
_OUTCOMES = {"success": "ok", "interrupted": "cancelled"}


def comfyui_block(fake: FakeComfyUI, **extra: Any) -> dict[str, Any]:
    """A ``comfyui`` backend on the fake, with timeouts short enough for a fault scenario."""
    return {
        "type": "comfyui", "base_url": fake.url, "workflow": "sd15", "poll_interval": 0.5,
        "connect_timeout": 2.0, "timeout": 30, **extra,
    }  # fmt: skip


class GpuLedger:
    def __init__(self, fake: FakeComfyUI, *, duration: float, foreign_duration: float = 0.0) -> None:
        self.fake = fake
        self.duration = duration
        self.foreign_duration = foreign_duration
        self.tags: dict[str, str] = {}  # prompt id -> job tag
        self.jobs: dict[str, uuid.UUID] = {}  # job tag -> job id
        fake.plan = self._plan

    def _plan(self, prompt_id: str, graph: dict[str, Any]) -> Plan:
        tag = _TAG.search(str(graph))
        if tag is None:
            return Plan(duration=self.foreign_duration)
        self.tags[prompt_id] = tag.group(1)
        return Plan(duration=self.duration)

    async def insert(self, db: asyncpg.Pool, count: int, *, backend: str = "gpu") -> list[uuid.UUID]:
        """``count`` tagged jobs for ``backend``."""
        ids = []
        for _ in range(count):
            tag = str(len(self.jobs) + 1)
            job_id: uuid.UUID = await db.fetchval(
                "INSERT INTO imagen.jobs (owner_user_id, prompt, backend, width, height, steps) "
                "VALUES ($1, $2, $3, 512, 512, 4) RETURNING id",
                OWNER,
                f"a lighthouse [job:{tag}]",
                backend,
            )
            self.jobs[tag] = job_id
            ids.append(job_id)
        return ids

    def executions(self) -> list[Execution]:
        """Our jobs' executions on the fake GPU (foreign prompts left out), in start order."""
        runs = []
        for run in self.fake.executions:
            tag = self.tags.get(run.prompt_id)
            if tag is None:
                continue
            runs.append(
                Execution(
                    job=str(self.jobs[tag]), attempt=None, pid=0, backend="gpu", start=run.start,
                    end=run.end, outcome=_OUTCOMES.get(run.outcome, run.outcome),
                )
            )  # fmt: skip
        return runs

    def foreign_busy(self) -> list[tuple[float, float | None]]:
        return [(run.start, run.end) for run in self.fake.executions if run.prompt_id not in self.tags]
