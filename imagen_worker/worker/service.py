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
from imagen_worker.observability import metrics as m
from imagen_worker.observability.metrics import HealthServer, Readiness
from imagen_worker.observability.sdnotify import Notifier
from imagen_worker.queries import sql
from imagen_worker.worker.daemon import Worker

log = structlog.get_logger("imagen.service")

_OUTCOMES = {"done", "failed", "retried", "cancelled", "released"}


def record_metrics(event: str, data: dict[str, Any]) -> None:
    backend = str(data.get("backend"))
    if event == "claimed":
        m.JOBS_CLAIMED.labels(backend=backend).inc()
        m.PICKUP_LATENCY.labels(backend=backend).observe(max(data["job"].waited_seconds, 0.0))
        m.JOBS_IN_FLIGHT.labels(backend=backend).inc()
        return
    if event in _OUTCOMES:
        m.JOBS_FINISHED.labels(backend=backend, outcome=event).inc()
        m.JOBS_IN_FLIGHT.labels(backend=backend).dec()
    artifact = data.get("artifact")
    if artifact is not None:
        for stage, seconds in artifact.timings.items():
            m.STAGE_DURATION.labels(backend=backend, stage=stage).observe(seconds)
        m.STAGE_DURATION.labels(backend=backend, stage="total").observe(sum(artifact.timings.values()))


class Service:
    def __init__(self, config: Config, dsn: str, *, run_migrations: bool = True, serve_metrics: bool = True):
        self.config = config
        self.worker = Worker(config, dsn, run_migrations=run_migrations)
        self.worker.hooks.append(record_metrics)
        self.serve_metrics = serve_metrics and config.metrics.enabled
        self.notifier = Notifier.from_env()
        self.health: HealthServer | None = None
        self._backend_health: dict[str, bool] = {}
        self._last_loop_tick = time.monotonic()

    async def readiness(self) -> Readiness:
        try:
            await self.worker.pool.fetchval(sql("ping"), timeout=2)
            database = True
        except Exception:
            database = False
        return Readiness(
            database=database,
            listener=self.worker.listener.connected,
            backends=dict(self._backend_health),
        )

    async def _observe(self) -> None:
        """Every few seconds: listener and backend gauges, queue depth, loop liveness."""
        seen_reconnects = 0
        while True:
            self._last_loop_tick = time.monotonic()
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
                m.BACKEND_HEALTHY.labels(backend=name).set(1 if healthy else 0)
            try:
                await m.METRICS.refresh_queue_depth(self.worker.pool)
            except Exception as exc:
                log.warning("queue depth refresh failed", error=str(exc))
            await asyncio.sleep(5)

    def _alive(self) -> bool:
        """Withhold watchdog pings when the observe loop has stalled for long."""
        return time.monotonic() - self._last_loop_tick < 60

    async def run(self) -> None:
        worker = self.worker
        worker.install_signal_handlers()
        self.notifier.status("starting: migrating and connecting")
        await worker.start()
        m.METRICS.prime(worker.backends)
        tasks = [
            asyncio.create_task(self._observe()),
            asyncio.create_task(self.notifier.keepalive(self._alive)),
        ]
        if self.serve_metrics:
            self.health = HealthServer(self.config.metrics.host, self.config.metrics.port, self.readiness)
            port = await self.health.start()
            log.info("metrics and health endpoints listening", host=self.config.metrics.host, port=port)
        self.notifier.ready()
        self.notifier.status(f"serving {', '.join(sorted(worker.backends))}")
        try:
            await worker.claim_loop()
        finally:
            self.notifier.stopping()
            self.notifier.status("draining in-flight jobs")
            released_before = len(worker.inflight)
            await worker.shutdown()
            if released_before:
                log.info("shutdown complete", in_flight_at_stop=released_before)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.health is not None:
                await self.health.stop()
            self.notifier.close()
