"""``imagen submit --wait``: follow one job through ``imagen_job_events`` with a progress bar.

Events carry only id and status, so each one (and a 1 s poll, in case an event is missed)
triggers a re-read of the row.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any
from uuid import UUID

import asyncpg
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from imagen_worker.queries import sql
from imagen_worker.queue.jobs import Queue

TERMINAL = {"done", "failed", "cancelled"}
EVENTS_CHANNEL = "imagen_job_events"


async def follow(conn: asyncpg.Connection, job_id: UUID, console: Console) -> asyncpg.Record:
    """Block until the job is terminal, showing progress on ``console``; returns the final row."""
    changed = asyncio.Event()

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
                label = row["status"]
                if row["status"] == "running" and progress:
                    label = f"running {progress.get('value', 0):g}/{progress.get('max', 0):g}"
                bar.update(task, description=label, completed=float(progress.get("fraction", 0.0)))
                if row["status"] in TERMINAL:
                    return row
                changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), timeout=1.0)
    finally:
        await conn.remove_listener(EVENTS_CHANNEL, on_event)


async def image_path(conn: asyncpg.Connection, image_id: UUID) -> str:
    row = await conn.fetchrow(sql("get_image"), image_id)
    if row is None:
        return ""
    return str(row["local_path"] or row["storage_path"])
