"""The ``JobContext`` a backend sees while the worker runs one job."""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime
from typing import Any

import structlog

from imagen_worker.errors import LeaseLost
from imagen_worker.queue.jobs import Job, Queue

log = structlog.get_logger("imagen.job")


class WorkerJobContext:
    """Progress goes to ``jobs.progress`` at most once per ``min_interval`` (the last value wins)."""

    def __init__(self, queue: Queue, job: Job, *, min_interval: float = 1.0) -> None:
        self.queue = queue
        self.job = job
        self.min_interval = min_interval
        self._ref = job.backend_ref
        self.cancel_requested = False
        self._latest: dict[str, Any] | None = None
        self._last_write = 0.0
        self._flush: asyncio.Task[None] | None = None
        self._flush_now = asyncio.Event()

    @property
    def backend_ref(self) -> str | None:
        return self._ref

    async def set_backend_ref(self, ref: str) -> None:
        await self.queue.set_backend_ref(self.job, ref)
        self._ref = ref

    def report_progress(self, value: float, maximum: float, **extra: Any) -> None:
        fraction = min(max(value / maximum, 0.0), 1.0) if maximum else 0.0
        self._latest = {
            "value": value,
            "max": maximum,
            "fraction": round(fraction, 4),
            **extra,
            "updated_at": datetime.now(UTC).isoformat(),
        }
        if self._flush is None or self._flush.done():
            delay = max(0.0, self._last_write + self.min_interval - time.monotonic())
            self._flush = asyncio.create_task(self._write_after(delay))

    async def _write_after(self, delay: float) -> None:
        if delay:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._flush_now.wait()
        latest, self._latest = self._latest, None
        if latest is None:
            return
        self._last_write = time.monotonic()
        try:
            await self.queue.set_progress(self.job, latest)
        except LeaseLost:
            return
        except Exception as exc:  # progress is best effort; the job goes on
            log.warning("progress write failed", job_id=str(self.job.id), error=str(exc))

    async def close(self) -> None:
        """Write the last progress now, before the final transition.

        A waiting throttled write is woken, not cancelled: cancelling it mid-write could leave
        a half-opened pool connection behind.
        """
        self._flush_now.set()
        if self._flush is not None and not self._flush.done():
            await asyncio.shield(self._flush)
        await self._write_after(0)
