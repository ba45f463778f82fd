"""What a web user reads on a job's row is one clean sentence; the operator keeps the rest.

Storage behind a reverse proxy answers outages with an HTML page; a ComfyUI error names the
instance's internal address. Neither may reach the row a web user reads.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import asyncpg
import pytest
from structlog.testing import capture_logs

from imagen_worker.backends.base import GenerateRequest
from imagen_worker.errors import BackendUnavailable
from imagen_worker.storage import outage
from tests.fakes.storage import FakeStorage
from tests.workers import eventually, insert_job, make_config, running_worker, terminal, waiting_for_storage

OWNER = uuid.UUID("00000000-0000-4000-8000-0000000000e1")


async def test_a_proxys_html_error_page_reaches_neither_the_row_nor_the_log_and_the_job_waits_it_out(
    db: asyncpg.Pool, database_url: str, tmp_path: Path, storage: FakeStorage
) -> None:
    storage.fail_next(2, status="proxy_502", methods=["PUT"])
    config = make_config(tmp_path, storage={"type": "supabase", "max_retries": 1})
    with capture_logs() as logs:
        async with running_worker(config, database_url):
            job_id = await insert_job(db, "a red kite", owner_user_id=OWNER, max_attempts=1)
            waiting = await eventually(lambda: waiting_for_storage(db, job_id))
            job = await terminal(db, job_id, within=15)

    assert waiting["progress"]["message"] == outage.WAITING_MESSAGE
    assert (job["status"], job["attempts"], job["error"]) == ("done", 1, None)
    reasons = [line["reason"] for line in logs if line["event"].startswith("storage does not take the file")]
    assert reasons == ["storage upload failed after 2 attempt(s): HTTP 502 (502): 502 Bad Gateway"]


async def test_an_internal_address_in_a_backend_error_stays_with_the_operator(
    db: asyncpg.Pool, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from imagen_worker.backends.mock import MockBackend

    async def unreachable(self: MockBackend, request: object, ctx: object) -> object:
        raise BackendUnavailable("ComfyUI at http://10.20.30.40:8188 is unreachable (connection refused)")

    monkeypatch.setattr(MockBackend, "generate", unreachable)
    config = make_config(tmp_path, worker={"max_outage_requeues": 0})
    async with running_worker(config, database_url):
        job = await terminal(db, await insert_job(db, "a heron", owner_user_id=OWNER, max_attempts=1))

    assert job["status"] == "failed"
    assert job["error"] == "ComfyUI is unreachable (connection refused) (gave up after 1 attempt)"
    assert "10.20.30.40" in job["error_detail"]["message"]


async def test_a_damaged_image_fails_the_job_in_words_and_the_next_job_still_runs(
    db: asyncpg.Pool, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from imagen_worker.backends.mock import MockBackend, render_png

    async def damaged_for_kites(self: MockBackend, request: GenerateRequest, index: int) -> bytes:
        png = bytearray(render_png(request.prompt, request.seed, request.width, request.height))
        if "kite" in request.prompt:
            png[png.index(b"IDAT") + 6] ^= 0xFF  # the pixel data's checksum no longer matches
        return bytes(png)

    monkeypatch.setattr(MockBackend, "_render", damaged_for_kites)
    output = {"directory": str(tmp_path / "images"), "cloud_sync": "off", "format": "webp"}
    async with running_worker(make_config(tmp_path, output=output), database_url):
        kite = await terminal(db, await insert_job(db, "a red kite", owner_user_id=OWNER, max_attempts=2))
        heron = await terminal(db, await insert_job(db, "a heron", owner_user_id=OWNER))

    assert kite["status"] == "failed" and kite["attempts"] == 2
    assert kite["error"] == "the backend's PNG image is damaged and cannot be read (gave up after 2 attempts)"
    assert heron["status"] == "done"
    left = [p.name for p in (tmp_path / "images").rglob("*") if p.is_file()]
    assert not [name for name in left if "kite" in name or str(kite["id"]) in name], (
        "nothing of the damaged job stays on disk"
    )
    assert any("heron" in name for name in left)
