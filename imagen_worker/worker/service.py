"""The daemon as a service: the worker plus metrics, health endpoints and systemd notify.

Kept apart from ``daemon.py`` so the claim loop knows nothing about Prometheus or systemd:
the worker emits events, and this module turns them into metrics.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog

from imagen_worker.config import Config
from imagen_worker.errors import said
from imagen_worker.observability import metrics as m
from imagen_worker.observability.metrics import HealthServer, Readiness
from imagen_worker.observability.sdnotify import Notifier
from imagen_worker.queries import sql
from imagen_worker.worker.daemon import Worker
from imagen_worker.worker.running import Event

log = structlog.get_logger("imagen.service")

DEPTH_WITHIN = 3.0  # seconds the queue-depth gauge may take; the other gauges wait on it

_OUTCOMES = {Event.DONE, Event.FAILED, Event.RETRIED, Event.REQUEUED, Event.CANCELLED, Event.RELEASED}


def record_metrics(event: Event, data: dict[str, Any]) -> None:
    backend = str(data.get("backend"))
    if event is Event.CLAIMED:
        m.JOBS_CLAIMED.labels(backend=backend).inc()
        m.PICKUP_LATENCY.labels(backend=backend).observe(max(data["job"].waited_seconds, 0.0))
        m.JOBS_IN_FLIGHT.labels(backend=backend).inc()
        return
    if event is Event.BACKEND_UNAVAILABLE:
        m.BACKEND_OUTAGES.labels(backend=backend).inc()
        return
    if event is Event.STORAGE_WAITING:
        m.STORAGE_WAITS.labels(backend=backend).inc()
        return
    if event is Event.ENDED:  # every claimed job's task ends once, lease lost or not
        m.JOBS_IN_FLIGHT.labels(backend=backend).dec()
        return
    if event in _OUTCOMES:
        m.JOBS_FINISHED.labels(backend=backend, outcome=event.value).inc()
    artifact = data.get("artifact")
    if artifact is not None:
        timings = artifact.timings
        for stage, seconds in timings.items():
            m.STAGE_DURATION.labels(backend=backend, stage=stage).observe(seconds)
        total = sum(timings.get(stage, 0.0) for stage in ("claim", "generate", "write", "upload", "record"))
        m.STAGE_DURATION.labels(backend=backend, stage="total").observe(total)


class Service:
    def __init__(self, config: Config, dsn: str, *, run_migrations: bool = True, serve_metrics: bool = True):
        self.config = config
        self.worker = Worker(config, dsn, run_migrations=run_migrations)
        self.worker.hooks.append(record_metrics)
        self.worker.webhook_hooks.append(lambda outcome: m.WEBHOOK_DELIVERIES.labels(outcome=outcome).inc())
        self.serve_metrics = serve_metrics and config.metrics.enabled
        self.notifier = Notifier.from_env()
        self.health: HealthServer | None = None
        self._backend_health: dict[str, bool] = {}
        self._status = ""

    async def readiness(self) -> Readiness:
        try:
            await self.worker.pool.fetchval(sql("ping"), timeout=2)
            database = True
        except Exception:
            database = False
        unavailable = {
            name: reason
            for name in self.worker.backends
            if (reason := self.worker.fleet.unavailable_reason(name)) is not None
        }
        return Readiness(
            database=database,
            listener=self.worker.listener.connected,
            backends={name: ok and name not in unavailable for name, ok in self._backend_health.items()},
            unavailable=unavailable,
        )

    async def _observe(self) -> None:
        """Every few seconds: listener, backend and disk gauges; the queue depth when it is due."""
        seen_reconnects = 0
        depth_due = 0.0
        while True:
            listener = self.worker.listener
            m.LISTENER_CONNECTED.set(1 if listener.connected else 0)
            if listener.reconnects > seen_reconnects:
                m.LISTENER_RECONNECTS.inc(listener.reconnects - seen_reconnects)
                seen_reconnects = listener.reconnects
            for name, backend in self.worker.backends.items():
                try:
                    async with asyncio.timeout(5):  # not wait_for: it can swallow our cancel on 3.11
                        healthy = (await backend.health()).ok
                except Exception:
                    healthy = False
                self._backend_health[name] = healthy
                available = healthy and backend.unavailable_reason is None
                m.BACKEND_HEALTHY.labels(backend=name).set(1 if available else 0)
            self._say(self.status_line())
            m.OUTPUT_WRITABLE.set(0 if self.worker.fleet.disk.reason else 1)
            if time.monotonic() >= depth_due:
                try:
                    # Bounded: a stalled database must not hold the gauges above for a minute.
                    async with asyncio.timeout(DEPTH_WITHIN):
                        depth_due = time.monotonic() + await m.METRICS.refresh_queue_depth(self.worker.pool)
                except Exception as exc:
                    depth_due = time.monotonic() + DEPTH_WITHIN
                    log.warning("queue depth refresh failed", error=said(exc))
            await asyncio.sleep(5)

    def status_line(self) -> str:
        """systemd's STATUS=: what this worker serves, and each backend that takes no work, why."""
        idle = self.worker.fleet.unavailable()
        for name, backend in self.worker.backends.items():
            down = backend.unavailable_reason is not None or not self._backend_health.get(name, True)
            if down and name not in idle:
                idle[name] = backend.unavailable_detail or "its health check fails"
        serving = ", ".join(name for name in sorted(self.worker.backends) if name not in idle) or "nothing"
        return "; ".join(
            [f"serving {serving}", *(f"{name} takes no work: {why}" for name, why in sorted(idle.items()))]
        )

    def _say(self, status: str) -> None:
        """A new STATUS= when it changed; the drain's own line stays once the stop began."""
        if status != self._status and not self.worker.draining.is_set():
            self._status = status
            self.notifier.status(status)

    def _alive(self) -> bool:
        """Feed the watchdog only while the claim and heartbeat loops make progress.

        Every database wait of either loop ends within ``command_timeout`` (plus a heartbeat
        interval), so a loop silent for longer than that and a lease is wedged, not waiting on
        an unreachable database: then systemd may restart the worker.
        """
        interval = self.notifier.watchdog_interval or 0.0
        bound = self.config.worker.lease_seconds + self.config.database.command_timeout
        return self.worker.liveness.progressing(max(interval * 2, bound))

    async def _announce_stop(self) -> None:
        await self.worker.draining.wait()
        self.notifier.stopping()
        self.notifier.status(f"draining {len(self.worker.running)} running jobs")

    async def run(self) -> None:
        worker = self.worker
        worker.install_signal_handlers()
        self.notifier.status("starting: migrating and connecting")
        await worker.start()
        m.METRICS.prime(worker.backends)
        try:
            if self.serve_metrics:
                self.health = HealthServer(self.config.metrics.host, self.config.metrics.port, self.readiness)
                port = await self.health.start()
                log.info("metrics and health endpoints listening", host=self.config.metrics.host, port=port)
            async with asyncio.TaskGroup() as group:
                helpers = [
                    group.create_task(self._observe()),
                    group.create_task(self.notifier.keepalive(self._alive)),
                    group.create_task(self._announce_stop()),
                ]
                self.notifier.ready()
                self._say(self.status_line())
                try:
                    await worker.serve()
                finally:
                    for helper in helpers:
                        helper.cancel()
        finally:
            await worker.close()  # already closed by serve() unless it never started
            if self.health is not None:
                await self.health.stop()
            self.notifier.close()
