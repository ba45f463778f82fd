"""``imagen-worker run``: claim jobs, run them through the pipeline, record the outcome.

Four loops run side by side in one task group, and each running job is a task in another:

- the claim loop wakes on a NOTIFY (the listener), on a finished job, on a backend's change
  hook, or on the safety poll (``worker.poll_interval``, shortened to the next ``run_at``),
  and claims up to the free capacity of every available backend. A backend whose last claim
  came back short is not asked again until something may have made rows runnable (a NOTIFY,
  this worker's own retry or release, a freed per-owner slot, the poll): a job ending, or
  ComfyUI reporting its queue, is no reason to read an empty backlog again;
- the heartbeat loop renews the leases of the running (job, attempt)s every third of a
  lease, and stops any job whose lease it could not renew for two thirds of a lease, so the
  lease never expires while this worker still runs the job;
- the control loop re-reads the rows after any ``imagen_control`` message: a message is a
  hint, only a row's ``cancel_requested`` cancels;
- the disk loop looks at the output directory every second (``disk.OutputDisk``): while it
  cannot take a job's files the claim loop claims nothing.

The daemon never dies on a bad row: every failure is recorded on its job and the loops go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any
from uuid import uuid4

import asyncpg
import structlog

from imagen_worker import __version__
from imagen_worker import backends as backend_registry
from imagen_worker.backends.base import Backend
from imagen_worker.config import Config
from imagen_worker.db import migrate as migrations
from imagen_worker.db.connect import connect, create_pool, describe_dsn
from imagen_worker.errors import ConfigError, RetryableError, said
from imagen_worker.pipeline import Pipeline
from imagen_worker.queue.jobs import Job, JobKey, Queue
from imagen_worker.storage import create_sink
from imagen_worker.webhooks import outbox as webhooks
from imagen_worker.worker.context import WorkerJobContext
from imagen_worker.worker.disk import MIB, OutputDisk
from imagen_worker.worker.fleet import Fleet
from imagen_worker.worker.listener import Listener
from imagen_worker.worker.previews import Previews
from imagen_worker.worker.running import DB_ERRORS, Event, JobRunner, RunningJob, StopReason

log = structlog.get_logger("imagen.worker")

Hook = Callable[[Event, dict[str, Any]], None]
# This worker's own outcomes that put a row back to pending (now or at a later run_at).
BACK_TO_PENDING = frozenset({Event.RETRIED, Event.REQUEUED, Event.RELEASED})


class Liveness:
    """When the claim and heartbeat loops last made progress; feeds the systemd watchdog."""

    def __init__(self) -> None:
        self.claim_busy_since: float | None = None
        self.heartbeat_at = time.monotonic()

    def progressing(self, within: float) -> bool:
        now = time.monotonic()
        claim_ok = self.claim_busy_since is None or now - self.claim_busy_since < within
        return claim_ok and now - self.heartbeat_at < within


class Worker:
    def __init__(self, config: Config, dsn: str, *, run_migrations: bool = True) -> None:
        self.config = config
        self.dsn = dsn
        self.run_migrations = run_migrations
        self.settings = config.worker
        self.id = uuid4()
        self.default_backend = config.default_backend_name()
        self.backends: dict[str, Backend] = {}
        self.running: dict[JobKey, RunningJob] = {}
        self.hooks: list[Hook] = []
        self.webhook_hooks: list[webhooks.OnOutcome] = []
        self.outbox: webhooks.Outbox | None = None
        self.liveness = Liveness()
        self.wake = asyncio.Event()  # claim now
        # Bumped by everything that may make rows runnable; a backend's last short claim
        # (``_dry``) holds only while the generation it saw is still the current one.
        self._generation = 0
        self._dry: dict[str, int] = {}
        self.control = asyncio.Event()  # a control message arrived: re-read cancel flags
        self.ready = asyncio.Event()
        self.draining = asyncio.Event()  # first stop signal
        self.force = asyncio.Event()  # second stop signal
        self._resources = contextlib.AsyncExitStack()
        self.pool: asyncpg.Pool
        self.queue: Queue
        self.pipeline: Pipeline
        self.listener: Listener
        self.fleet: Fleet
        self.runner: JobRunner
        self._jobs: asyncio.TaskGroup

    @property
    def stopping(self) -> bool:
        return self.draining.is_set()

    # --- lifecycle -------------------------------------------------------------------

    async def run(self) -> None:
        await self.start()
        await self.serve()

    async def start(self) -> None:
        """Open everything the loops need; on failure, close what was opened and raise."""
        try:
            await self._open()
        except BaseException:
            await self.close()
            raise

    async def _open(self) -> None:
        self._check_default_backend()
        secret = webhooks.read_secret(self.config.webhooks) if self.config.webhooks else b""
        stack = self._resources
        if self.run_migrations:
            await self._migrate()
        limits = self.config.database
        self.pool = await create_pool(
            self.dsn, min_size=2, max_size=self.settings.concurrency + 4, limits=limits, full_reset=False
        )
        stack.push_async_callback(self._close_pool)
        blocks = self.config.backend_blocks()
        for name in self.config.served_backends():
            backend = backend_registry.create(name, blocks[name])
            await backend.start()
            stack.push_async_callback(backend.aclose)
            backend.watch(self.wake.set)
            self.backends[name] = backend
        sink = create_sink(self.config)
        stack.push_async_callback(sink.aclose)
        try:
            await sink.check()  # a wrong key or a missing bucket stops the worker here
        except RetryableError as exc:
            log.warning("storage unreachable at start; uploads will retry", error=exc.message)
        self.pipeline = Pipeline(self.backends, self.default_backend, sink, self.config.output)
        self.queue = Queue(self.pool, self.id)
        output = self.config.output
        disk = OutputDisk(output.directory, output.min_free_mb * MIB)
        await disk.check()  # a worker started on a full disk claims nothing from the first wake-up
        self.fleet = Fleet(
            self.queue, self.backends, self.default_backend, self.settings, self._emit, disk,
            storage_held=self._held_by_storage,
        )  # fmt: skip
        self.runner = JobRunner(self.queue, self.pipeline, self.settings, output.directory, self._emit, disk)
        await webhooks.configure(self.pool, self.config.webhooks)
        if self.config.webhooks is not None:
            self.outbox = webhooks.Outbox(
                self.pool, self.id, self.config.webhooks, secret, self._webhook_outcome
            )
            self.hooks.append(self.outbox.job_ended)
        await self._register()
        stack.push_async_callback(self._unregister)
        await self._recover_expired()
        self.listener = Listener(
            self.dsn, self._rows_changed, self.control.set, server_settings=limits.session_settings()
        )
        await self.listener.start()
        stack.push_async_callback(self.listener.stop)
        log.info(
            "worker started", worker_id=str(self.id), database=describe_dsn(self.dsn),
            backends=sorted(self.backends), default_backend=self.default_backend, storage=sink.type_name,
            concurrency=self.settings.concurrency,
        )  # fmt: skip

    async def _recover_expired(self) -> None:
        """Dead workers' jobs back to pending now; the claim would re-take them anyway."""
        try:
            requeued = await self.queue.requeue_expired()
        except DB_ERRORS as exc:
            log.warning("could not recover expired leases at start; claims will", error=said(exc))
            return
        log.info("recovered expired leases", requeued=requeued)

    def _check_default_backend(self) -> None:
        """One meaning of "no backend": this worker's default, which it must serve."""
        served = self.config.served_backends()
        unknown = [name for name in served if name not in self.config.backend_blocks()]
        if unknown:
            raise ConfigError(f"worker.backends names unknown backend {unknown[0]!r}")
        if self.default_backend not in served:
            implicit = "" if self.config.default_backend else " (the first configured backend)"
            raise ConfigError(
                f"default_backend: {self.default_backend!r}{implicit} is not served by this worker "
                f"(it serves {', '.join(served)}); set default_backend to one of them"
            )

    async def _migrate(self) -> None:
        # Its own connection, without the statement timeout: a migration may take long.
        conn = await connect(self.dsn, application_name="imagen-worker migrate")
        try:
            applied = await migrations.migrate(conn)
        finally:
            await conn.close()
        if applied:
            log.info("migrations applied", versions=applied)

    async def serve(self) -> None:
        """The loops, until a stop signal; then finish or hand back the running jobs."""
        try:
            async with asyncio.TaskGroup() as loops:
                heartbeat = loops.create_task(self._heartbeat_loop(), name="imagen-heartbeat")
                control = loops.create_task(self._control_loop(), name="imagen-control")
                disk = loops.create_task(self._disk_loop(), name="imagen-disk")
                if self.outbox:
                    loops.create_task(self.outbox.run(), name="imagen-webhooks")
                async with asyncio.TaskGroup() as jobs:
                    self._jobs = jobs
                    self.wake.set()
                    self.ready.set()
                    await self._claim_loop()
                    await self._wind_down()
                heartbeat.cancel()
                control.cancel()
                disk.cancel()
                if self.outbox:
                    self.outbox.stop()
        finally:
            await self.close()
            log.info("worker stopped", worker_id=str(self.id))

    async def close(self) -> None:
        """Stop the listener, mark this worker stopped, close backends, sink and pool (once)."""
        await self._resources.aclose()

    def request_stop(self) -> None:
        """First signal: stop claiming and drain. Second: stop waiting for running jobs."""
        if self.stopping:
            log.warning("second stop signal: releasing running jobs now")
            self.force.set()
        else:
            log.info("stop requested: finishing running jobs", running=len(self.running))
            self.draining.set()
        self.wake.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)

    async def _wind_down(self) -> None:
        """Let running jobs finish within ``shutdown_grace``; hand the rest back to pending."""
        self._jobs.create_task(self._say_draining(), name="imagen-draining")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.shutdown_grace):
                while self.running and not self.force.is_set():
                    self.wake.clear()
                    await self.wake.wait()
        for running in list(self.running.values()):
            running.stop(StopReason.SHUTDOWN)

    async def _close_pool(self) -> None:
        try:
            async with asyncio.timeout(10):
                await self.pool.close()
        except TimeoutError:
            self.pool.terminate()

    # --- the claim loop -------------------------------------------------------------

    def _rows_changed(self) -> None:
        """Rows may be runnable that were not: every backend is worth a claim again."""
        self._generation += 1
        self.wake.set()

    async def _claim_loop(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    await self.wake.wait()
            except TimeoutError:
                self._generation += 1  # time passed: delayed rows came due, leases expired
            self.wake.clear()
            if self.stopping:
                return
            self.liveness.claim_busy_since = time.monotonic()
            try:
                await self.fleet.refresh()
                drained, asked = await self._drain()
                # Slots full: a job settling wakes the loop, the poll interval is the fallback.
                # Backlog drained: ask when the next scheduled job is due. A wake-up that asked
                # nothing keeps the deadline it found.
                if asked or loop.time() >= deadline:
                    timeout = await self._poll_timeout() if drained else self.settings.poll_interval
                    deadline = loop.time() + timeout
            except DB_ERRORS as exc:
                log.warning("claim failed; retrying at the next wake-up", error=said(exc))
                deadline = loop.time() + min(1.0, self.settings.poll_interval)
            except Exception:
                log.exception("claim loop iteration failed; retrying at the next wake-up")
                deadline = loop.time() + self.settings.poll_interval
            finally:
                self.liveness.claim_busy_since = None

    async def _drain(self) -> tuple[bool, bool]:
        """Claim until every available backend is full or the backlog is empty.

        Returns (drained, asked): drained when some backend had a slot left that its backlog
        could not fill, asked when a claim went to the database.
        """
        drained = asked = False
        for name in self.backends:
            if not await self.fleet.available(name):
                self._dry.pop(name, None)
                continue
            if self._dry.get(name) == self._generation:
                drained = drained or self._free_slots(name) > 0
                continue
            is_default = name == self.default_backend
            while not self.stopping and (free := self._free_slots(name)) > 0:
                asked = True
                generation = self._generation
                sent = time.monotonic()
                jobs = await self.queue.claim(
                    name, is_default=is_default, limit=free, lease_seconds=self.settings.lease_seconds,
                    orphans=self.fleet.orphans if is_default else (),
                    orphan_after=self.settings.orphan_after, held=[key[0] for key in self.running],
                    max_running_per_owner=self.settings.max_running_per_owner,
                )  # fmt: skip
                for job in jobs:
                    self._start_job(job, name, sent)
                if len(jobs) < free:
                    drained = True
                    self._dry[name] = generation
                    break
        return drained, asked

    def _free_slots(self, backend: str) -> int:
        """Slots are held by jobs that still use their backend; a settled job (its outcome being
        written) holds none, so the next claim overlaps the last commit. Settled jobs may add
        at most ``concurrency`` more in memory, should the database be slow to take them."""
        working = [running for running in self.running.values() if not running.settled]
        busy = sum(1 for running in working if running.backend == backend)
        total_free = min(
            self.settings.concurrency - len(working), 2 * self.settings.concurrency - len(self.running)
        )
        return max(0, min(self.backends[backend].capacity - busy, total_free))

    def _held_by_storage(self, backend: str) -> int:
        """How many jobs take every slot ``backend`` has here while they wait for Storage to
        take their images; 0 while a slot is free or a job in one still works."""
        working = [running for running in self.running.values() if not running.settled]
        if not working or self._free_slots(backend) > 0:
            return 0
        return len(working) if all(running.waiting_for_storage for running in working) else 0

    async def _poll_timeout(self) -> float:
        until_next = await self.queue.seconds_until_next_run()
        if until_next is None:
            return self.settings.poll_interval
        return min(self.settings.poll_interval, max(until_next, 0.01))

    def _start_job(self, job: Job, backend: str, claimed_at: float) -> None:
        previews = Previews(
            self.pipeline.sink, self.config.output.directory, job.owner_user_id, job.id,
            keep=self.config.output.keep_previews, ran_before=job.ran_before,
        )  # fmt: skip
        running = RunningJob(
            job, backend, WorkerJobContext(self.queue, job, previews=previews), on_settled=self._slot_freed
        )
        running.claim_seconds = time.monotonic() - claimed_at
        self.running[running.key] = running
        running.renewed(claimed_at, self._stop_after)
        running.task = self._jobs.create_task(self.runner.run(running), name=f"imagen-job-{job.id}")
        running.task.add_done_callback(lambda _: self._job_finished(running))
        self._emit(Event.CLAIMED, job=job, backend=backend)

    def _job_finished(self, running: RunningJob) -> None:
        running.finished()
        self.running.pop(running.key, None)
        self._slot_freed()
        self._emit(Event.ENDED, job=running.job, backend=running.backend)

    def _slot_freed(self) -> None:
        # Under a per-owner cap, a job ending may let its owner's next job run.
        if self.settings.max_running_per_owner is None:
            self.wake.set()
        else:
            self._rows_changed()

    # --- the heartbeat loop ---------------------------------------------------------

    @property
    def _stop_after(self) -> float:
        """Stop a job this long after its last renewal: before the lease could expire."""
        return self.settings.lease_seconds * 2 / 3

    async def _heartbeat_loop(self) -> None:
        interval = self.settings.lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            try:
                async with asyncio.timeout(interval):
                    await self._heartbeat()
            except DB_ERRORS as exc:
                log.warning("heartbeat failed", error=said(exc))
            except Exception:
                log.exception("heartbeat failed")
            self.liveness.heartbeat_at = time.monotonic()

    async def _heartbeat(self) -> None:
        sent = time.monotonic()
        renewals = await self.queue.heartbeat(list(self.running), self.settings.lease_seconds)
        for key, renewal in renewals.items():
            running = self.running.get(key)
            if running is None:
                continue
            if not renewal.ours:
                running.stop(StopReason.LEASE_LOST)
            elif renewal.cancel_requested:
                running.stop(StopReason.CANCELLED)
            elif renewal.renewed:
                running.renewed(sent, self._stop_after)
        await self._register()

    async def _register(self) -> None:
        await self.queue.register(
            socket.gethostname(), os.getpid(), sorted(self.backends), self.settings.lease_seconds * 2,
            self.default_backend, version=__version__, draining=self.stopping,
            unavailable=self.fleet.unavailable(),
        )  # fmt: skip

    async def _say_draining(self) -> None:
        """The registry says so at once (``imagen workers``), not at the next heartbeat; a
        database that does not answer delays nothing of the drain."""
        try:
            async with asyncio.timeout(5):
                await self._register()
        except DB_ERRORS as exc:
            log.warning("could not mark this worker draining in the registry", error=said(exc))

    async def _unregister(self) -> None:
        try:
            await self.queue.unregister()
        except DB_ERRORS as exc:
            log.warning("could not mark this worker stopped in the registry", error=said(exc))

    # --- the disk loop --------------------------------------------------------------

    async def _disk_loop(self) -> None:
        """Look at the output disk every ``recheck_seconds``, off the claim path: claims stop
        while it cannot take a job's files (``Fleet.available``) and start again at once when
        it can."""
        disk = self.fleet.disk
        while True:
            await asyncio.sleep(disk.recheck_seconds)
            held = disk.reason is not None
            try:
                await disk.check()
            except Exception:
                log.exception("could not look at the output disk")
            if held and disk.reason is None:
                self._rows_changed()

    # --- the control loop -----------------------------------------------------------

    async def _control_loop(self) -> None:
        while True:
            await self.control.wait()
            self.control.clear()
            try:
                requested = await self.queue.cancel_requested(list(self.running))
            except DB_ERRORS as exc:
                log.warning("could not re-read cancel requests; the heartbeat will", error=said(exc))
                continue
            for key in requested:
                if (running := self.running.get(key)) is not None:
                    running.stop(StopReason.CANCELLED)

    def _webhook_outcome(self, outcome: webhooks.Outcome) -> None:
        for hook in self.webhook_hooks:
            hook(outcome)

    def _emit(self, event: Event, **data: Any) -> None:
        if event in BACK_TO_PENDING:
            self._rows_changed()
        elif event is Event.STORAGE_WAITING:
            self.wake.set()  # its last free slot may be gone to Storage: say so on the rows
        for hook in self.hooks:
            try:
                hook(event, data)
            except Exception:
                log.exception("event hook failed", hook_event=str(event))
