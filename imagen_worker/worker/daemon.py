"""``imagen-worker run``: claim jobs, run them through the pipeline, record the outcome.

Wake-ups come from the listener (milliseconds after an INSERT commits), from a finished job
freeing capacity, and from the safety poll (``worker.poll_interval``, shortened to the next
``run_at``). Every wake drains the backlog up to free capacity. Heartbeats run in their own
task so job work can never starve them. The daemon never dies on a bad row: every failure is
recorded on its job and the loop goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from uuid import UUID, uuid4

import asyncpg
import structlog

from imagen_worker import backends as backend_registry
from imagen_worker import pipeline as pipeline_module
from imagen_worker.backends.base import Backend
from imagen_worker.config import Config
from imagen_worker.db import migrate as migrations
from imagen_worker.db.connect import create_pool
from imagen_worker.errors import ConfigError, JobError, LeaseLost, RetryableError
from imagen_worker.pipeline import Artifact, Pipeline
from imagen_worker.queue.jobs import ImageRecord, Job, JobSpec, Queue
from imagen_worker.storage import create_sink
from imagen_worker.storage.base import StorageSink
from imagen_worker.worker.context import WorkerJobContext
from imagen_worker.worker.listener import Listener

log = structlog.get_logger("imagen.worker")

# Why a running job's task was cancelled: decides what (if anything) is written afterwards.
CANCEL, LEASE_LOST, SHUTDOWN = "cancel", "lease_lost", "shutdown"


@dataclass
class InFlight:
    job: Job
    backend: str
    ctx: WorkerJobContext
    task: asyncio.Task[None]


def spec_of(job: Job) -> JobSpec:
    return JobSpec(
        owner_user_id=job.owner_user_id, prompt=job.prompt, negative_prompt=job.negative_prompt,
        backend=job.backend, style=job.style, width=job.width, height=job.height, steps=job.steps,
        seed=job.seed, params=job.params, max_attempts=job.max_attempts,
    )  # fmt: skip


def image_record(artifact: Artifact) -> ImageRecord:
    return ImageRecord(
        storage_path=artifact.storage_key, mime_type=artifact.mime_type, bytes=artifact.bytes,
        sha256=artifact.sha256, backend=artifact.backend, seed=artifact.seed,
        latency_ms=artifact.latency_ms, sidecar=artifact.sidecar, model=artifact.model,
    )  # fmt: skip


class Worker:
    def __init__(self, config: Config, dsn: str, *, run_migrations: bool = True) -> None:
        self.config = config
        self.dsn = dsn
        self.run_migrations = run_migrations
        self.id = uuid4()
        self.settings = config.worker
        self.inflight: dict[UUID, InFlight] = {}
        self.backends: dict[str, Backend] = {}
        self.default_backend = config.default_backend_name()
        self.wake = asyncio.Event()
        self.stopping = False
        self.force = asyncio.Event()
        self.ready = asyncio.Event()
        self.hooks: list[Callable[[str, dict[str, Any]], None]] = []
        self._cancel_reasons: dict[UUID, str] = {}
        self._orphans: list[str] = []
        self._orphans_checked = float("-inf")
        self._tasks: list[asyncio.Task[None]] = []
        self.pool: asyncpg.Pool
        self.queue: Queue
        self.sink: StorageSink
        self.pipeline: Pipeline
        self.listener: Listener

    # --- lifecycle -------------------------------------------------------------------

    async def run(self) -> None:
        await self.start()
        try:
            await self.claim_loop()
        finally:
            await self.shutdown()

    async def start(self) -> None:
        self.pool = await create_pool(self.dsn, min_size=2, max_size=self.settings.concurrency + 4)
        if self.run_migrations:
            async with self.pool.acquire() as conn:
                applied = await migrations.migrate(conn)
            if applied:
                log.info("migrations applied", versions=applied)
        blocks = self.config.backend_blocks()
        for name in self.config.served_backends():
            if name not in blocks:
                raise ConfigError(f"worker.backends names unknown backend {name!r}")
            backend = backend_registry.create(name, blocks[name])
            await backend.start()
            self.backends[name] = backend
        if self.default_backend not in self.backends:
            self.default_backend = next(iter(self.backends))
        self.sink = create_sink(self.config)
        try:
            await self.sink.check()  # a wrong key or a missing bucket stops the worker here
        except RetryableError as exc:
            log.warning("storage unreachable at start; uploads will retry", error=exc.message)
        self.pipeline = Pipeline(self.backends, self.default_backend, self.sink, self.config.output)
        self.queue = Queue(self.pool, self.id)
        await self._register()
        requeued = await self.queue.requeue_expired()
        log.info("recovered expired leases", requeued=requeued)
        self.listener = Listener(self.dsn, self.wake.set, self._on_cancel)
        await self.listener.start()
        self._tasks.append(asyncio.create_task(self._heartbeat_loop(), name="imagen-heartbeat"))
        log.info(
            "worker started",
            worker_id=str(self.id),
            backends=sorted(self.backends),
            default_backend=self.default_backend,
            storage=self.sink.type_name,
            concurrency=self.settings.concurrency,
        )
        self.wake.set()
        self.ready.set()

    def request_stop(self) -> None:
        """First signal: stop claiming and drain. Second: stop waiting for in-flight jobs."""
        if self.stopping:
            log.warning("second stop signal: releasing in-flight jobs now")
            self.force.set()
            return
        log.info("stop requested: finishing in-flight jobs", in_flight=len(self.inflight))
        self.stopping = True
        self.wake.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)

    async def shutdown(self) -> None:
        pending: set[asyncio.Future[Any]] = {f.task for f in self.inflight.values()}
        if pending:
            force: asyncio.Future[Any] = asyncio.ensure_future(self.force.wait())
            deadline = time.monotonic() + self.settings.shutdown_grace
            while pending and not force.done() and (left := deadline - time.monotonic()) > 0:
                _, pending = await asyncio.wait(
                    {*pending, force}, timeout=left, return_when=asyncio.FIRST_COMPLETED
                )
                pending.discard(force)
            force.cancel()
        leftover = list(self.inflight.values())
        for flight in leftover:
            self._cancel_job(flight.job.id, SHUTDOWN)
        await asyncio.gather(*(f.task for f in leftover), return_exceptions=True)
        if leftover:
            released = await self.queue.release([f.job.key for f in leftover])
            for flight in leftover:
                self._emit("released", job=flight.job, backend=flight.backend)
            log.info("released unfinished jobs back to pending", released=released)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.listener.stop()
        for backend in self.backends.values():
            await backend.aclose()
        await self.sink.aclose()
        try:
            await self.queue.unregister()
        finally:
            await self.pool.close()
        log.info("worker stopped", worker_id=str(self.id))

    # --- claiming ----------------------------------------------------------------------

    async def _poll_timeout(self) -> float:
        timeout = self.settings.poll_interval
        try:
            until_next = await self.queue.seconds_until_next_run()
        except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError):
            return timeout
        if until_next is not None:
            timeout = min(timeout, max(until_next, 0.01))
        return timeout

    async def claim_loop(self) -> None:
        while not self.stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), await self._poll_timeout())
            self.wake.clear()
            if self.stopping:
                break
            try:
                await self._drain()
            except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError, TimeoutError) as exc:
                log.warning("claim failed; retrying at the next wake-up", error=str(exc))
                await asyncio.sleep(min(1.0, self.settings.poll_interval))

    def _free_slots(self, backend: str) -> int:
        busy = sum(1 for f in self.inflight.values() if f.backend == backend)
        total_free = self.settings.concurrency - len(self.inflight)
        return max(0, min(self.backends[backend].capacity - busy, total_free))

    async def _orphan_backends(self) -> list[str]:
        """Backends no live worker serves, refreshed at most once per poll interval.

        The default backend's claims take their jobs so they fail with a clear error.
        """
        now = time.monotonic()
        if now - self._orphans_checked >= self.settings.poll_interval:
            self._orphans = await self.queue.orphan_backends(self.settings.orphan_after)
            self._orphans_checked = now
        return self._orphans

    async def _drain(self) -> None:
        """Claim until every backend is full or the backlog is empty."""
        for name in self.backends:
            while not self.stopping and (free := self._free_slots(name)) > 0:
                is_default = name == self.default_backend
                jobs = await self.queue.claim(
                    name, is_default=is_default, limit=free, lease_seconds=self.settings.lease_seconds,
                    orphans=await self._orphan_backends() if is_default else (),
                    orphan_after=self.settings.orphan_after, held=list(self.inflight),
                )  # fmt: skip
                for job in jobs:
                    self._spawn(job, name)
                if len(jobs) < free:
                    break

    def _spawn(self, job: Job, backend: str) -> None:
        ctx = WorkerJobContext(self.queue, job)
        task = asyncio.create_task(self._run_job(job, backend, ctx), name=f"imagen-job-{job.id}")
        self.inflight[job.id] = InFlight(job, backend, ctx, task)
        self._emit("claimed", job=job, backend=backend)

        def finished(_: asyncio.Task[None]) -> None:
            self.inflight.pop(job.id, None)
            self._cancel_reasons.pop(job.id, None)
            self.wake.set()

        task.add_done_callback(finished)

    # --- heartbeats and cancellation ---------------------------------------------------

    async def _register(self) -> None:
        await self.queue.register(
            socket.gethostname(), os.getpid(), sorted(self.backends), self.settings.lease_seconds * 2,
            self.default_backend,
        )  # fmt: skip

    async def _heartbeat_loop(self) -> None:
        interval = self.settings.lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            try:
                await self._heartbeat()
            except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError, TimeoutError) as exc:
                log.warning("heartbeat failed", error=str(exc))

    async def _heartbeat(self) -> None:
        keys = [flight.job.key for flight in self.inflight.values()]
        renewed = await self.queue.heartbeat(keys, self.settings.lease_seconds)
        for job_id, attempt in keys:
            renewal = renewed.get((job_id, attempt))
            if renewal is None or not renewal.ours:
                self._cancel_job(job_id, LEASE_LOST)
            elif renewal.cancel_requested:
                self._cancel_job(job_id, CANCEL)
        await self._register()

    def _on_cancel(self, job_id: UUID) -> None:
        self._cancel_job(job_id, CANCEL)

    def _cancel_job(self, job_id: UUID, reason: str) -> None:
        flight = self.inflight.get(job_id)
        if flight is None or flight.task.done() or job_id in self._cancel_reasons:
            return
        self._cancel_reasons[job_id] = reason
        flight.ctx.cancel_requested = reason == CANCEL
        flight.task.cancel()

    # --- one job -------------------------------------------------------------------------

    async def _run_job(self, job: Job, backend: str, ctx: WorkerJobContext) -> None:
        # Bound in this job's own task context, so every line logged while it runs (the
        # backend's and the storage sink's too) carries the job's id, backend and attempt.
        structlog.contextvars.bind_contextvars(
            job_id=str(job.id), backend=job.backend or backend, attempt=job.attempts
        )
        jlog = log
        jlog.info("job claimed", waited_seconds=round(job.waited_seconds, 4))
        try:
            await self._execute(job, ctx, jlog)
        except LeaseLost as exc:
            jlog.warning("lease lost; another worker owns the job now", detail=str(exc))
        except asyncio.CancelledError:
            await ctx.close()
            reason = self._cancel_reasons.get(job.id)
            if reason is None:
                raise
            if reason == CANCEL:
                await self._quietly(self.queue.cancelled(job), jlog)
                self._emit("cancelled", job=job, backend=backend)
                jlog.info("job cancelled by its owner")
            elif reason == LEASE_LOST:
                jlog.warning("lease lost; stopped working on the job")
        except Exception as exc:  # a bug below us must not kill the daemon
            jlog.exception("unexpected error while running the job")
            error = RetryableError(f"internal error: {type(exc).__name__}: {exc}")
            await self._record_error(job, backend, error, jlog)

    async def _execute(self, job: Job, ctx: WorkerJobContext, jlog: Any) -> None:
        if job.attempts > job.max_attempts:
            message = (
                f"gave up after {job.max_attempts} attempts: the worker running this job "
                "stopped responding each time"
            )
            await self.queue.fail(job, message, {"attempts": job.attempts})
            self._emit("failed", job=job, backend=job.backend or self.default_backend)
            jlog.error("job failed", error=message)
            return
        if job.cancel_requested:
            await self.queue.cancelled(job)
            self._emit("cancelled", job=job, backend=job.backend or self.default_backend)
            return
        try:
            artifact = await self.pipeline.run(job.id, spec_of(job), ctx)
        except JobError as error:
            await ctx.close()
            await self._record_error(job, job.backend or self.default_backend, error, jlog)
            return
        await ctx.close()
        try:
            image_id = await self.queue.complete(job, image_record(artifact))
        except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
            # The image is on disk and in storage; the journal makes the retry reuse both.
            lost = RetryableError(f"could not record the result in the database: {exc}")
            await self._record_error(job, artifact.backend, lost, jlog)
            return
        pipeline_module.forget(self.config.output.directory, job.id)
        self._emit("done", job=job, backend=artifact.backend, artifact=artifact)
        jlog.info(
            "job done",
            image_id=str(image_id),
            path=str(artifact.image_path),
            storage_path=artifact.storage_key,
            reused_local_image=artifact.reused,
        )

    async def _record_error(self, job: Job, backend: str, error: JobError, jlog: Any) -> None:
        outcome = await self._quietly(
            self.queue.record_error(
                job, error, base=self.settings.retry_base_seconds, cap=self.settings.retry_max_seconds
            ),
            jlog,
        )
        if outcome is not None:
            self._emit(outcome, job=job, backend=backend, error=error)
            log_method = jlog.warning if outcome == "retried" else jlog.error
            log_method(f"job {outcome}", error=error.message, retryable=error.retryable)

    async def _quietly(self, write: Any, jlog: Any) -> Any:
        """A final write that may fail (lease lost, database down): the lease then expires and
        another attempt picks the job up, so logging is all that is left to do."""
        try:
            return await asyncio.shield(write)
        except LeaseLost:
            jlog.warning("lease lost before the outcome was recorded")
        except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
            jlog.error("could not record the outcome; the lease will expire", error=str(exc))
        return None

    def _emit(self, event: str, **data: Any) -> None:
        for hook in self.hooks:
            try:
                hook(event, data)
            except Exception:
                log.exception("event hook failed", hook_event=event)
