"""``imagen submit --wait``: follow one job through ``imagen_job_events`` with a progress bar.

Events carry only id and status, so each one (and a 1 s poll, in case an event is missed)
triggers a re-read of the row. A job nobody can run would wait in silence, so after a few
seconds the registry (``imagen.workers``) is asked whether a live worker serves its backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any
from uuid import UUID

import asyncpg
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from imagen_worker.cli import failures
from imagen_worker.queries import sql
from imagen_worker.queue.jobs import Queue

TERMINAL = {"done", "failed", "cancelled"}
EVENTS_CHANNEL = "imagen_job_events"


WORKER_CHECK_AFTER = 3.0  # seconds a job may sit pending before the registry is asked
WORKER_CHECK_EVERY = 5.0


def no_worker_message(backend: str | None, served: list[str]) -> str:
    """Names the database (a worker on another one, a URL missing from this shell, is no worker
    here) and what the live workers serve (a typo in --backend waits for nobody)."""
    which = f"backend {backend!r}" if backend else "jobs without a backend"
    live = f" (live workers serve: {', '.join(served)})" if served else ""
    return (
        f"no live worker serves {which} on {failures.state.database}{live}: the job stays queued "
        "until one starts (imagen-worker run); Ctrl-C leaves it queued"
    )


def pending_label(row: asyncpg.Record) -> str:
    """``pending``, with the worker's reason when it wrote one (``progress.message``)."""
    progress = row["progress"] or {}
    message = progress.get("message") if isinstance(progress, dict) else None
    return f"pending: {message}" if message else "pending"


def running_label(progress: dict[str, object]) -> str:
    """``running`` with the backend's step count, or why a finished render waits (Storage)."""
    if progress.get("stage") == "waiting_for_storage":
        return f"running: {progress.get('message')}"
    return f"running {progress.get('value', 0):g}/{progress.get('max', 0):g}"


async def follow(
    conn: asyncpg.Connection,
    job_id: UUID,
    console: Console,
    *,
    worker_check_after: float = WORKER_CHECK_AFTER,
) -> asyncpg.Record:
    """Block until the job is terminal, showing progress on ``console``; returns the final row."""
    changed = asyncio.Event()
    started = time.monotonic()
    next_worker_check = started + worker_check_after
    warned = False

    def on_event(_c: Any, _pid: int, _channel: str, payload: str) -> None:
        if str(job_id) in payload:
            changed.set()

    await conn.add_listener(EVENTS_CHANNEL, on_event)
    queue = Queue(conn)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
    )
    try:
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task("pending", total=1.0)
            while True:
                row = await queue.get(job_id)
                if row is None:
                    raise LookupError(f"job {job_id} disappeared")
                progress = row["progress"] or {}
                label = pending_label(row) if row["status"] == "pending" else row["status"]
                if row["status"] == "pending" and time.monotonic() >= next_worker_check:
                    next_worker_check = time.monotonic() + WORKER_CHECK_EVERY
                    live = await conn.fetchval(sql("live_workers_for_backend"), row["backend"])
                    if not live and not warned:
                        served = await conn.fetchval(sql("live_backends"))
                        console.print(f"imagen: {no_worker_message(row['backend'], served)}", highlight=False)
                    warned = warned or not live
                if row["status"] == "running" and progress:
                    label = running_label(progress)
                bar.update(task, description=label, completed=float(progress.get("fraction", 0.0)))
                if row["status"] in TERMINAL:
                    return row
                changed.clear()
                # Not wait_for: on 3.11 it can swallow the cancel Ctrl-C sends, if the event is
                # set in the same loop iteration; the watch would then go on.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await changed.wait()
    finally:
        await conn.remove_listener(EVENTS_CHANNEL, on_event)


async def image_path(conn: asyncpg.Connection, image_id: UUID) -> str:
    row = await conn.fetchrow(sql("get_image"), image_id)
    if row is None:
        return ""
    return str(row["local_path"] or row["storage_path"])


async def image_paths(conn: asyncpg.Connection, job_id: UUID) -> list[str]:
    """Every image of the job's batch, main image first: the local path, else the storage key."""
    rows = await conn.fetch(sql("job_images"), job_id)
    return [str(row["local_path"] or row["storage_path"]) for row in rows]
