"""Group commit for completions: jobs that finish close together are recorded in one commit.

The first completion to arrive is written at once; completions that arrive while that write
is in flight wait for it and then go together in the next statement (up to ``max_batch``).
An idle worker therefore adds no delay, and a busy one pays one round trip and one WAL flush
for many jobs. Each job stays fenced on its own (``complete_batch``): a job whose lease was
lost raises ``LeaseLost`` for that job only, and a conflicting images row is retried alone
through ``Queue.complete``, which says exactly what conflicted.
"""

from __future__ import annotations

import asyncio
from uuid import UUID

from imagen_worker.errors import LeaseLost
from imagen_worker.queue.jobs import Completion, ImageRecord, Job, Queue

_Waiting = tuple[Job, ImageRecord, "asyncio.Future[Completion]"]


class CompletionBatcher:
    def __init__(self, queue: Queue, max_batch: int = 64) -> None:
        self.queue = queue
        self.max_batch = max_batch
        self._waiting: list[_Waiting] = []
        self._writer: asyncio.Task[None] | None = None

    async def complete(self, job: Job, image: ImageRecord) -> UUID:
        """Like ``Queue.complete``: the images row and ``done`` together, or nothing."""
        future: asyncio.Future[Completion] = asyncio.get_running_loop().create_future()
        self._waiting.append((job, image, future))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_all(), name="imagen-completions")
        # Shielded: a waiter that is cancelled does not take the others' write down with it.
        outcome = await asyncio.shield(future)
        if outcome.image_id is not None:
            return outcome.image_id
        if not outcome.fenced:
            raise LeaseLost(f"job {job.id}: lease lost before complete")
        return await self.queue.complete(job, image)

    async def _write_all(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting[: self.max_batch], self._waiting[self.max_batch :]
                await self._write(batch)
        finally:
            self._writer = None

    async def _write(self, batch: list[_Waiting]) -> None:
        try:
            outcomes = await self.queue.complete_many([(job, image) for job, image, _ in batch])
        except BaseException as exc:  # the database's error is each waiting job's error
            for *_, future in batch:
                if future.done():
                    continue
                if isinstance(exc, Exception):
                    future.set_exception(exc)
                else:
                    future.cancel()
            if not isinstance(exc, Exception):
                raise
            return
        for (*_, future), outcome in zip(batch, outcomes, strict=True):
            if not future.done():
                future.set_result(outcome)
