"""The ``JobContext`` a backend sees while the worker runs one job."""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime
from typing import Any

import structlog

from imagen_worker.errors import LeaseLost, said
from imagen_worker.queue.jobs import Job, Queue
from imagen_worker.worker.previews import Previews

log = structlog.get_logger("imagen.job")


class WorkerJobContext:
    """Progress goes to ``jobs.progress`` at most once per ``min_interval`` (the last value wins).

    ``progress.percent`` (0-100) is always there; ``progress.preview`` names the Storage key of
    the live preview once one was uploaded, and is dropped again when the preview is deleted.
    The first write waits ``first_after`` seconds from the claim: a job that is over by then
    writes no progress at all (its final transition says everything), which spares a
    millisecond job a row update and its notification.
    """

    def __init__(
        self,
        queue: Queue,
        job: Job,
        *,
        min_interval: float = 1.0,
        first_after: float = 0.25,
        previews: Previews | None = None,
    ) -> None:
        self.queue = queue
        self.job = job
        self.min_interval = min_interval
        self._ref = job.backend_ref
        self.cancel_requested = False
        self._latest: dict[str, Any] | None = None
        self._written = False
        # As if a write happened just before the claim: the first one is due ``first_after`` on.
        self._last_write = time.monotonic() - min_interval + first_after
        self._flush: asyncio.Task[None] | None = None
        self._flush_now = asyncio.Event()
        self._progress: dict[str, Any] | None = None  # the last reported, for a preview's key
        self._preview: str | None = None
        self.previews = previews
        if previews is not None:
            previews.on_stored = self._preview_stored

    @property
    def backend_ref(self) -> str | None:
        return self._ref

    async def set_backend_ref(self, ref: str) -> None:
        await self.queue.set_backend_ref(self.job, ref)
        self._ref = ref

    @property
    def first_claim(self) -> bool:
        return not self.job.ran_before

    def report_progress(self, value: float, maximum: float, **extra: Any) -> None:
        fraction = min(max(value / maximum, 0.0), 1.0) if maximum else 0.0
        self._progress = {
            "value": value,
            "max": maximum,
            "fraction": round(fraction, 4),
            "percent": round(fraction * 100, 1),
            **extra,
        }
        self._schedule()

    def report_preview(self, data: bytes, mime_type: str) -> None:
        if self.previews is not None:
            self.previews.offer(data, mime_type)

    def _preview_stored(self, key: str) -> None:
        if key != self._preview:
            self._preview = key
            self._schedule()

    def _schedule(self) -> None:
        if self._progress is None:
            return
        preview = {"preview": self._preview} if self._preview else {}
        self._latest = {**self._progress, **preview, "updated_at": datetime.now(UTC).isoformat()}
        if self._flush is None or self._flush.done():
            delay = max(0.0, self._last_write + self.min_interval - time.monotonic())
            self._flush = asyncio.create_task(self._write_after(delay))

    async def _write_after(self, delay: float) -> None:
        """Write the latest report once ``delay`` passed; then again, an interval later, what
        was reported during the write: a long node reports as it starts and then nothing until
        it ends, and its report must not wait for that."""
        while True:
            if delay:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._flush_now.wait()
            latest, self._latest = self._latest, None
            if latest is None:
                return
            self._written = True
            self._last_write = time.monotonic()
            try:
                await self.queue.set_progress(self.job, latest)
            except LeaseLost:
                return
            except Exception as exc:  # progress is best effort; the job goes on
                log.warning("progress write failed", job_id=str(self.job.id), error=said(exc))
            delay = max(0.0, self._last_write + self.min_interval - time.monotonic())

    async def close(self) -> None:
        """Write the last progress now, before the final transition.

        A waiting throttled write is woken, not cancelled: cancelling it mid-write could leave
        a half-opened pool connection behind. Preview uploads stop first, and the last
        progress no longer names the preview unless previews are kept (``discard_previews``
        deletes it once the outcome is recorded). Nothing is written for a job that wrote no
        progress yet: the row has none to correct.
        """
        if self.previews is not None:
            await self.previews.stop()
            if not self.previews.keep and self._preview is not None:
                self._preview = None
                self._schedule()
        if not self._written:
            self._latest = None  # a throttled first write, when woken, finds nothing to do
        self._flush_now.set()
        if self._flush is not None and not self._flush.done():
            await asyncio.shield(self._flush)
        await self._write_after(0)

    async def discard_previews(self) -> None:
        """The job's previews go from Storage; after its outcome, which no row names them in."""
        if self.previews is not None:
            await self.previews.discard()
