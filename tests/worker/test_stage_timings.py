"""Where a job's time goes: every stage in the images row's sidecar and in the stage histogram."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import asyncpg

from imagen_worker.observability import metrics as m
from imagen_worker.worker.running import Event
from imagen_worker.worker.service import record_metrics
from tests.workers import image_row, insert_job, make_config, running_worker, terminal

OWNER = uuid.UUID("00000000-0000-4000-8000-0000000057a9")


def stage_count(stage: str) -> float:
    value = m.REGISTRY.get_sample_value(
        "imagen_stage_duration_seconds_count", {"backend": "mock", "stage": stage}
    )
    return value or 0.0


async def test_a_done_job_records_each_stage_in_its_sidecar_and_in_metrics(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    events: list[tuple[Event, dict[str, Any]]] = []
    before = {stage: stage_count(stage) for stage in m.STAGES}
    async with running_worker(make_config(tmp_path), database_url) as worker:
        worker.hooks.append(lambda event, data: events.append((event, data)))
        worker.hooks.append(record_metrics)
        job_id = await insert_job(db, "a tide pool", owner_user_id=OWNER)
        job = await terminal(db, job_id, within=5.0)
    assert job["status"] == "done", job["error"]

    image = await image_row(db, job["image_id"])
    timings = image["sidecar"]["timings_ms"]
    assert {"claim", "execute", "generate", "write", "upload"} <= set(timings)
    assert all(isinstance(ms, float) and ms >= 0 for ms in timings.values())
    assert timings["execute"] <= timings["generate"]

    (artifact,) = [data["artifact"] for event, data in events if event is Event.DONE]
    assert artifact.timings["record"] > 0, "the upload record and the final commit are timed"
    for stage in ("claim", "execute", "write", "upload", "record", "total"):
        assert stage_count(stage) == before[stage] + 1, stage
