"""One running job: its task, its context, why it was stopped, and the code that runs it.

A job is keyed by (job id, attempt): one execution. Whatever stops it early (its owner's
cancel, a lease another worker took, a lease this worker could not renew in time, shutdown)
is recorded as a ``StopReason`` before its task is cancelled, so the task knows what to
write afterwards. Once the outcome is being written the job is ``settled`` and no longer
stoppable: a final write is never interrupted halfway.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import asyncpg
import structlog

from imagen_worker import pipeline as pipeline_module
from imagen_worker.config import WorkerConfig
from imagen_worker.errors import JobError, LeaseLost, Outage, OutputUnwritable, RetryableError, said
from imagen_worker.pipeline import Pipeline
from imagen_worker.queue.batch import CompletionBatcher
from imagen_worker.queue.jobs import Job, JobKey, JobSpec, Outcome, Queue
from imagen_worker.storage import outage
from imagen_worker.worker import disk, results
from imagen_worker.worker.context import WorkerJobContext
from imagen_worker.worker.disk import OutputDisk

log = structlog.get_logger("imagen.worker")

T = TypeVar("T")
DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


class StopReason(enum.Enum):
    """Why a running job's task was cancelled; decides what is written afterwards."""

    CANCELLED = "cancelled by its owner"
    LEASE_LOST = "another worker owns the job now"
    LEASE_UNRENEWED = "its lease could not be renewed in time"
    SHUTDOWN = "the worker is shutting down"


class Event(enum.StrEnum):
    """What the worker tells its hooks (metrics, tests, benchmarks)."""

    CLAIMED = "claimed"
    DONE = "done"
    FAILED = "failed"
    RETRIED = "retried"
    REQUEUED = "requeued"
    CANCELLED = "cancelled"
    RELEASED = "released"
    BACKEND_UNAVAILABLE = "backend_unavailable"
    BACKEND_AVAILABLE = "backend_available"
    STORAGE_WAITING = "storage_waiting"  # the job waits for Storage to answer again
    ENDED = "ended"  # the job's task is over, whatever it recorded (or could not record)


Emit = Callable[..., None]


@dataclass(eq=False)
class RunningJob:
    job: Job
    backend: str
    ctx: WorkerJobContext
    task: asyncio.Task[None] | None = None
    stop_reason: StopReason | None = None
    settled: bool = False
    # The image is on local disk: a shutdown lets the upload and the final write finish (each
    # has its own timeouts) instead of throwing the render away for another worker to repeat.
    rendered: bool = False
    # A shutdown that came while the job was rendered and uploading: it stops the job if the
    # upload then has to wait for Storage (``mark_waiting``).
    shutdown_deferred: bool = False
    # Waiting for Storage, to take the image or to serve an input image (``mark_waiting``),
    # until it answers (``storage_answered``).
    waiting_for_storage: bool = False
    claim_seconds: float = 0.0  # the claim statement's round trip, the job's first stage
    # Called once the job is settled: it no longer uses its backend, so its slot can take the
    # next job while the outcome is written (group-committed with others).
    on_settled: Callable[[], None] = field(default=lambda: None, repr=False)
    _deadline: asyncio.TimerHandle | None = field(default=None, repr=False)

    @property
    def key(self) -> JobKey:
        return self.job.key

    def stop(self, reason: StopReason) -> None:
        """Cancel the job's task for ``reason``; the first reason wins."""
        if self.stop_reason is not None or self.settled or self.task is None or self.task.done():
            return
        if reason is StopReason.SHUTDOWN and self.rendered:
            self.shutdown_deferred = True
            return
        self.stop_reason = reason
        self.ctx.cancel_requested = reason is StopReason.CANCELLED
        self.task.cancel()

    def mark_rendered(self) -> None:
        self.rendered = True

    def storage_answered(self) -> None:
        """Storage took the upload, or served the input image, after a wait."""
        self.waiting_for_storage = False

    def mark_waiting(self) -> None:
        """The job waits for Storage, which may take hours: a shutdown may stop it now, and the
        next attempt on this host uploads the image the journal kept (or renders, if none yet)."""
        self.rendered = False
        self.waiting_for_storage = True
        if self.shutdown_deferred:
            self.stop(StopReason.SHUTDOWN)

    def settle(self) -> None:
        """The outcome is being written: no longer stoppable, and its backend slot is free."""
        if not self.settled:
            self.settled = True
            self.on_settled()

    def renewed(self, sent_at: float, stop_after: float) -> None:
        """The lease was renewed by a statement sent at ``sent_at`` (monotonic).

        Unless renewed again, the job stops ``stop_after`` seconds later, before the lease
        can expire: a lease is only ever re-taken after its holder let go.
        """
        if self._deadline is not None:
            self._deadline.cancel()
        delay = max(0.0, sent_at + stop_after - time.monotonic())
        self._deadline = asyncio.get_running_loop().call_later(delay, self.stop, StopReason.LEASE_UNRENEWED)

    def finished(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()


def spec_of(job: Job) -> JobSpec:
    return JobSpec(
        owner_user_id=job.owner_user_id, prompt=job.prompt, negative_prompt=job.negative_prompt,
        backend=job.backend, style=job.style, width=job.width, height=job.height, steps=job.steps,
        seed=job.seed, params=job.params, max_attempts=job.max_attempts, workflow=job.workflow,
        n=job.n, format=job.format, quality=job.quality,
    )  # fmt: skip


class JobRunner:
    """Runs one claimed job to its recorded outcome; never raises (the daemon never dies)."""

    def __init__(
        self,
        queue: Queue,
        pipeline: Pipeline,
        settings: WorkerConfig,
        output_dir: Path,
        emit: Emit,
        disk: OutputDisk,
    ) -> None:
        self.queue = queue
        self.pipeline = pipeline
        self.settings = settings
        self.output_dir = output_dir
        self.emit = emit
        self.disk = disk
        self.completions = CompletionBatcher(queue)

    async def run(self, running: RunningJob) -> None:
        job = running.job
        # Bound in this job's own task context, so every line logged while it runs (the
        # backend's and the storage sink's too) carries the job's id, backend and attempt.
        structlog.contextvars.bind_contextvars(
            job_id=str(job.id), backend=running.backend, attempt=job.attempts
        )
        log.info("job claimed", waited_seconds=round(job.waited_seconds, 4))
        try:
            await self._execute(running)
        except LeaseLost as exc:
            log.warning("lease lost; another worker owns the job now", detail=str(exc))
        except asyncio.CancelledError:
            if running.stop_reason is None:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()  # the stop is handled here; later awaits must not see it again
            try:
                async with asyncio.timeout(self.settings.lease_seconds / 3):
                    await running.ctx.close()
                    await self._stopped(running, running.stop_reason)
            except TimeoutError:
                log.warning("could not record why the job stopped; its lease will expire")
        except Exception as exc:  # a bug below us must not kill the daemon
            log.exception("unexpected error while running the job")
            running.settle()
            await self._record_error(running, RetryableError(
                f"the worker hit an internal error ({type(exc).__name__})",
                detail={"exception": type(exc).__name__, "error": str(exc)},
            ))  # fmt: skip
        # Only now: a slow Storage delete must not delay the outcome its owner waits for.
        await running.ctx.discard_previews()

    async def _execute(self, running: RunningJob) -> None:
        job = running.job
        if job.attempts > job.max_attempts:
            running.settle()
            message = (
                f"gave up after {job.max_attempts} attempts: the worker running this job "
                "stopped responding each time"
            )
            await self.queue.fail(job, message, {"attempts": job.attempts})
            self.emit(Event.FAILED, job=job, backend=running.backend)
            log.error("job failed", error=message)
            return
        if job.cancel_requested:
            running.settle()
            await self.queue.cancelled(job)
            self.emit(Event.CANCELLED, job=job, backend=running.backend)
            return

        def waiting() -> None:
            running.mark_waiting()
            self.emit(Event.STORAGE_WAITING, job=job, backend=running.backend)

        try:
            records, artifact = await results.produce(
                self.pipeline,
                self.queue,
                job,
                spec_of(job),
                running.ctx,
                claim_seconds=running.claim_seconds,
                rendered=running.mark_rendered,
                patience=outage.Patience(
                    running.ctx, waiting, running.mark_rendered, answered=running.storage_answered
                ),
            )
            running.settle()
            await running.ctx.close()
            recording = time.perf_counter()
            # One-image jobs are group-committed with others finishing alongside; a batch of
            # images goes in its own transaction.
            if len(records) == 1:
                image_id = await self.completions.complete(job, records[0])
            else:
                image_id = await self.queue.complete(job, records)
            if artifact is not None:
                recorded = time.perf_counter() - recording
                artifact.timings["record"] = artifact.timings.get("record", 0.0) + recorded
        except JobError as error:
            await self._failed(running, error)
            return
        except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError, TimeoutError) as exc:
            if disk.full(exc):  # a file a backend keeps on this host (a spooled download)
                unkept = OutputUnwritable(f"could not keep the job's files on this host ({exc.strerror})")
                await self._failed(running, unkept)
                return
            # The object is stored and its upload recorded: the retry links it.
            running.settle()
            unrecorded = RetryableError(
                "could not record the result in the database", detail={"error": str(exc)}
            )
            await self._record_error(running, unrecorded)
            return
        pipeline_module.forget(self.output_dir, job.id)
        self.emit(Event.DONE, job=job, backend=records[0].backend, artifact=artifact)
        log.info(
            "job done",
            image_id=str(image_id),
            path=str(artifact.image_path) if artifact else None,
            storage_path=records[0].storage_path,
            images=len(records),
            linked_earlier_upload=artifact is None,
            reused_local_image=bool(artifact and artifact.reused),
        )

    async def _failed(self, running: RunningJob, error: JobError) -> None:
        if isinstance(error, OutputUnwritable):  # before the slot frees for the next claim
            self.disk.failed(error.detail.get("error", error.message))
        running.settle()
        await running.ctx.close()
        await self._record_error(running, error)

    async def _stopped(self, running: RunningJob, reason: StopReason) -> None:
        job = running.job
        if reason is StopReason.CANCELLED:
            if await self._quietly(self._write_cancelled(job)):
                await results.discard(self.output_dir, job)
                self.emit(Event.CANCELLED, job=job, backend=running.backend)
                log.info("job cancelled by its owner")
        elif reason is StopReason.LEASE_LOST:
            log.warning("lease lost; stopped working on the job")
        else:
            # Shutdown, or a lease this worker could not renew (database stalled, row locked):
            # hand the job back without spending its attempt. When the database cannot be
            # reached the lease simply expires and another worker takes the job.
            released = await self._quietly(self.queue.release([job.key]))
            if released:
                self.emit(Event.RELEASED, job=job, backend=running.backend)
            log.warning("job stopped and handed back", why=reason.value, released=bool(released))

    async def _record_error(self, running: RunningJob, error: JobError) -> None:
        job = running.job
        outcome = await self._quietly(
            self.queue.record_error(
                job, error, base=self.settings.retry_base_seconds, cap=self.settings.retry_max_seconds,
                max_outage_requeues=self.settings.max_outage_requeues,
            )
        )  # fmt: skip
        if outcome is None:
            return
        if outcome is Outcome.FAILED:
            await results.discard(self.output_dir, job)
        self.emit(Event(outcome.value), job=job, backend=running.backend, error=error)
        if outcome is Outcome.REQUEUED:
            log.warning("outage: job back to pending without spending an attempt",
                        error=error.message, outage_requeues=job.outage_requeues + 1)  # fmt: skip
        elif outcome is Outcome.RETRIED:
            log.warning("job retried", error=error.message, retryable=error.retryable)
        else:
            log.error("job failed", error=error.message, retryable=error.retryable)
        if isinstance(error, Outage) and outcome is not Outcome.REQUEUED:
            log.warning("outage requeues used up; the outage counted as an attempt")

    async def _write_cancelled(self, job: Job) -> bool:
        await self.queue.cancelled(job)
        return True

    async def _quietly(self, write: Awaitable[T]) -> T | None:
        """A final write that may fail (lease lost, database down): the lease then expires and
        another attempt picks the job up, so logging is all that is left to do. None = failed."""
        try:
            return await asyncio.shield(write)
        except LeaseLost:
            log.warning("lease lost before the outcome was recorded")
        except DB_ERRORS as exc:
            log.error("could not record the outcome; the lease will expire", error=said(exc))
        return None
