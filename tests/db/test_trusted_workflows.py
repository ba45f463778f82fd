"""Per-job workflows only from a trusted path: the ``jobs.workflow`` column (migration 0006) is
written by the operator, never by a web user, and the worker honours nothing else."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from imagen_worker.queue.jobs import JobSpec, Queue
from tests.cli.test_imagen import imagen
from tests.db.test_rls import ALICE, request_as
from tests.fakes.comfyui import FakeComfyUI
from tests.workers import insert_job, make_config, running_worker, terminal, write_config

GRAPH: dict[str, Any] = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": 255}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}},
}


async def test_a_web_user_inserts_as_before_but_cannot_write_the_workflow(db: asyncpg.Pool) -> None:
    async with request_as(db, "authenticated", ALICE) as conn:
        row = await conn.fetchrow(
            "INSERT INTO imagen.jobs (owner_user_id, prompt) VALUES ($1, 'p') RETURNING *", ALICE
        )
        assert row is not None and row["workflow"] is None, "insert().select() still works"

    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        async with request_as(db, "authenticated", ALICE) as conn:
            await conn.execute(
                "INSERT INTO imagen.jobs (owner_user_id, prompt, workflow) VALUES ($1, 'p', $2)",
                ALICE,
                {"graph": GRAPH},
            )
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        async with request_as(db, "authenticated", ALICE) as conn:
            await conn.execute(
                "UPDATE imagen.jobs SET workflow = $1 WHERE id = $2", {"graph": GRAPH}, row["id"]
            )


async def test_the_column_holds_a_json_object_only(db: asyncpg.Pool) -> None:
    with pytest.raises(asyncpg.CheckViolationError):
        await insert_job(db, workflow=[GRAPH])


async def test_the_operator_enqueues_a_workflow_and_the_claim_carries_it(db: asyncpg.Pool) -> None:
    owner = uuid.uuid4()
    job_id, _ = await Queue(db).enqueue(
        JobSpec(owner_user_id=owner, prompt="p", backend="trusted-wf", workflow={"graph": GRAPH})
    )

    (job,) = await Queue(db, uuid.uuid4()).claim("trusted-wf", is_default=False, limit=1, lease_seconds=30)

    assert job.id == job_id and job.workflow == {"graph": GRAPH}


async def test_the_worker_runs_the_operator_s_workflow_and_refuses_a_web_user_s(
    db: asyncpg.Pool, database_url: str, tmp_path: Path, fake_comfyui: FakeComfyUI
) -> None:
    block = {"type": "comfyui", "base_url": fake_comfyui.url, "workflow": "sd15", "poll_interval": 0.5}
    config = make_config(tmp_path, backends={"gpu": block})
    async with running_worker(config, database_url):
        trusted = await insert_job(db, "operator", width=512, height=512, workflow={"graph": GRAPH})
        web = await insert_job(db, "web", width=512, height=512, params={"workflow": GRAPH})
        done, failed = await terminal(db, trusted), await terminal(db, web)

    assert done["status"] == "done", done["error"]
    (submitted,) = [r.body["prompt"] for r in fake_comfyui.calls("POST", "/prompt")]
    assert submitted["1"]["class_type"] == "EmptyImage", "the job's own graph ran"
    assert failed["status"] == "failed"
    assert failed["error"].startswith('params.workflow is not allowed: backend "gpu" runs per-job workflows')


async def test_imagen_submit_workflow_writes_the_column(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    config = write_config(tmp_path)
    graph_file = tmp_path / "wf.json"
    graph_file.write_text(json.dumps({"graph": GRAPH, "bindings": {"prompt": "2.filename_prefix"}}))

    submitted = await asyncio.to_thread(
        imagen, "submit", "p", "--workflow", str(graph_file), dsn=database_url, config=config
    )
    broken = await asyncio.to_thread(
        imagen, "submit", "p", "--workflow", str(tmp_path / "none.json"), dsn=database_url, config=config
    )

    assert submitted.returncode == 0, submitted.stderr
    job_id = uuid.UUID(submitted.stdout.strip())
    row = await db.fetchrow("SELECT workflow FROM imagen.jobs WHERE id = $1", job_id)
    assert row["workflow"] == {"graph": GRAPH, "bindings": {"prompt": "2.filename_prefix"}}
    assert broken.returncode != 0
    assert "--workflow: cannot read" in broken.stderr and len(broken.stderr.strip().splitlines()) == 1
