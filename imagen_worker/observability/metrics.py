"""Prometheus metrics and the ``/metrics``, ``/healthz``, ``/readyz`` HTTP endpoints.

The metrics live on their own ``CollectorRegistry``: the global default registry would make a
second worker (or a test) in the same process fail with "Duplicated timeseries". The daemon
uses the module-level objects (``metrics.JOBS_CLAIMED.labels(backend=name).inc()``); tests that
need isolated counts build their own ``Metrics()``.

The HTTP server is ``asyncio.start_server`` with a minimal HTTP/1.1 handler (one request per
connection) so serving metrics adds no dependency and no thread: if the event loop wedges,
``/healthz`` stops answering, which is exactly what a liveness probe should see.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from time import monotonic
from typing import Any, Final

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

from imagen_worker.queries import sql

log = structlog.get_logger(__name__)

OUTCOMES: Final = ("done", "failed", "retried", "requeued", "cancelled", "released")
STAGES: Final = (
    "claim", "submit", "execute", "download", "generate", "write", "upload", "record", "total"
)  # fmt: skip
QUEUE_STATUSES: Final = ("pending", "running")
# The queue-depth count reads every live row: about 25 ms at 100,000 pending jobs and 300 ms at
# 1,000,000, per worker. Spaced so that it takes at most this share of the time (every 30 s at
# 1,000,000); a short queue is counted at every pass of the service's 5 s loop.
QUEUE_DEPTH_SHARE: Final = 0.01
WEBHOOK_OUTCOMES: Final = ("delivered", "retried", "failed")

# Pickup latency: a NOTIFY wake-up is ~1 ms on a LAN, a missed one waits for the 5 s poll,
# a saturated fleet queues for longer.
PICKUP_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Stage durations: uploads take tens of ms, a diffusion render seconds to minutes.
STAGE_BUCKETS: Final = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800)


class Metrics:
    """Every metric the worker exports, registered on one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.jobs_claimed = Counter(
            "imagen_jobs_claimed_total", "Jobs this worker claimed.", ["backend"], registry=r
        )
        self.jobs_finished = Counter(
            "imagen_jobs_finished_total",
            "Attempts that ended, by outcome (done|failed|retried|requeued|cancelled|released); "
            "requeued = back to pending without spending an attempt: the backend was down or the disk full.",
            ["backend", "outcome"],
            registry=r,
        )
        self.pickup_latency = Histogram(
            "imagen_pickup_latency_seconds",
            "Time from a job becoming runnable (created_at/run_at) to its claim.",
            ["backend"],
            buckets=PICKUP_BUCKETS,
            registry=r,
        )
        self.stage_duration = Histogram(
            "imagen_stage_duration_seconds",
            "Duration of each stage of a job: claim|submit|execute|download|write|upload|record; "
            "generate is the backend's whole call (submit + execute + download), total is "
            "claim + generate + write + upload + record.",
            ["backend", "stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "imagen_queue_depth", "Jobs in the queue table by status (fleet-wide).", ["status"], registry=r
        )
        self.jobs_in_flight = Gauge(
            "imagen_jobs_in_flight", "Jobs this worker is running now.", ["backend"], registry=r
        )
        self.listener_reconnects = Counter(
            "imagen_listener_reconnects_total", "Times the LISTEN connection was re-established.", registry=r
        )
        self.listener_connected = Gauge(
            "imagen_listener_connected", "1 while the LISTEN connection is up.", registry=r
        )
        self.backend_healthy = Gauge(
            "imagen_backend_healthy",
            "1 if the last health check passed and the backend takes work.",
            ["backend"],
            registry=r,
        )
        self.backend_outages = Counter(
            "imagen_backend_outages_total",
            "Times a backend became unavailable (its jobs then wait in the queue).",
            ["backend"],
            registry=r,
        )
        self.storage_waits = Counter(
            "imagen_storage_waits_total",
            "Jobs that waited for Storage to take their image (down, or unable to store) or serve an input.",
            ["backend"],
            registry=r,
        )
        self.output_writable = Gauge(
            "imagen_output_writable",
            "1 while the output directory takes a job's files; 0 = this worker claims nothing "
            "(less than output.min_free_mb free, or a job's files could not be written).",
            registry=r,
        )
        self.webhook_deliveries = Counter(
            "imagen_webhook_deliveries_total",
            "Webhook attempts by outcome (delivered|retried|failed); failed = given up for good.",
            ["outcome"],
            registry=r,
        )

    def prime(self, backends: Iterable[str]) -> None:
        """Create every label combination at zero so rates and alerts work before the first job."""
        for backend in backends:
            self.jobs_claimed.labels(backend=backend)
            self.pickup_latency.labels(backend=backend)
            self.jobs_in_flight.labels(backend=backend)
            self.backend_healthy.labels(backend=backend)
            self.backend_outages.labels(backend=backend)
            self.storage_waits.labels(backend=backend)
            for outcome in OUTCOMES:
                self.jobs_finished.labels(backend=backend, outcome=outcome)
            for stage in STAGES:
                self.stage_duration.labels(backend=backend, stage=stage)
        for status in QUEUE_STATUSES:
            self.queue_depth.labels(status=status)
        for outcome in WEBHOOK_OUTCOMES:
            self.webhook_deliveries.labels(outcome=outcome)

    async def refresh_queue_depth(self, conn: Any) -> float:
        """Set ``imagen_queue_depth`` from the table; ``conn`` is an asyncpg connection or pool.

        Counts only pending and running rows (both have partial indexes), so finished jobs
        cost nothing, but a long backlog does: the count reads every live row. Returns the
        seconds to wait before counting again, so that counting takes at most
        ``QUEUE_DEPTH_SHARE`` of the time.
        """
        started = monotonic()
        rows = await conn.fetch(
            sql("live_queue_depth"),
            list(QUEUE_STATUSES),
        )
        counts = {row["status"]: row["n"] for row in rows}
        for status in QUEUE_STATUSES:
            self.queue_depth.labels(status=status).set(counts.get(status, 0))
        return (monotonic() - started) / QUEUE_DEPTH_SHARE

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The registry in the text format the scraper asked for (Prometheus or OpenMetrics)."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


METRICS: Final = Metrics()
REGISTRY: Final = METRICS.registry
JOBS_CLAIMED: Final = METRICS.jobs_claimed
JOBS_FINISHED: Final = METRICS.jobs_finished
PICKUP_LATENCY: Final = METRICS.pickup_latency
STAGE_DURATION: Final = METRICS.stage_duration
QUEUE_DEPTH: Final = METRICS.queue_depth
JOBS_IN_FLIGHT: Final = METRICS.jobs_in_flight
LISTENER_RECONNECTS: Final = METRICS.listener_reconnects
LISTENER_CONNECTED: Final = METRICS.listener_connected
BACKEND_HEALTHY: Final = METRICS.backend_healthy
BACKEND_OUTAGES: Final = METRICS.backend_outages
STORAGE_WAITS: Final = METRICS.storage_waits
OUTPUT_WRITABLE: Final = METRICS.output_writable
WEBHOOK_DELIVERIES: Final = METRICS.webhook_deliveries


@dataclass(frozen=True)
class Readiness:
    """What ``/readyz`` reports: ready = database reachable, listener up, one backend available.

    ``unavailable`` maps each backend that takes no work right now to the reason.
    """

    database: bool
    listener: bool
    backends: dict[str, bool] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return self.database and self.listener and any(self.backends.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "database": self.database,
            "listener": self.listener,
            "backends": dict(self.backends),
            "unavailable": dict(self.unavailable),
        }


ReadinessCallback = Callable[[], Awaitable[Readiness]]

_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}
_MAX_HEAD = 16 * 1024


class HealthServer:
    """Serves ``/metrics``, ``/healthz`` and ``/readyz`` on ``host:port``.

    ``readiness`` is awaited on each ``/readyz`` with ``readiness_timeout``; a callback that
    raises or times out answers 503, because a probe that cannot tell is not ready.
    """

    def __init__(
        self,
        host: str,
        port: int,
        readiness: ReadinessCallback,
        *,
        metrics: Metrics | None = None,
        readiness_timeout: float = 5.0,
        request_timeout: float = 10.0,
    ) -> None:
        self.host = host
        self.port = port
        self._readiness = readiness
        self._metrics = metrics if metrics is not None else METRICS
        self._readiness_timeout = readiness_timeout
        self._request_timeout = request_timeout
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        """Bind and serve in the background; returns the bound port (useful with port 0)."""
        self._server = await asyncio.start_server(self._handle, self.host, self.port, limit=_MAX_HEAD)
        sockets = self._server.sockets
        bound: int = sockets[0].getsockname()[1] if sockets else self.port
        self.port = bound
        return bound

    async def stop(self) -> None:
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), timeout=2)

    async def __aenter__(self) -> HealthServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                async with asyncio.timeout(self._request_timeout):
                    head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                return
            lines = head.decode("latin-1").split("\r\n")
            parts = lines[0].split()
            if len(parts) != 3 or not parts[2].startswith("HTTP/"):
                await self._respond(writer, 400, b"bad request\n", "text/plain", head_only=False)
                return
            method, target = parts[0], parts[1]
            headers = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            head_only = method == "HEAD"
            if method not in ("GET", "HEAD"):
                await self._respond(writer, 405, b"method not allowed\n", "text/plain", head_only=False)
                return
            status, body, content_type = await self._route(target.split("?", 1)[0], headers)
            await self._respond(writer, status, body, content_type, head_only=head_only)
        except (ConnectionError, OSError):
            pass
        except Exception:
            log.exception("health endpoint failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _route(self, path: str, headers: dict[str, str]) -> tuple[int, bytes, str]:
        if path == "/metrics":
            body, content_type = self._metrics.exposition(headers.get("accept", ""))
            return 200, body, content_type
        if path == "/healthz":
            return 200, b"ok\n", "text/plain; charset=utf-8"
        if path == "/readyz":
            try:
                async with asyncio.timeout(self._readiness_timeout):
                    state = await self._readiness()
            except Exception as exc:
                # The body may be public (0.0.0.0 in containers): the type only; details go to the log.
                log.warning("readiness check failed", error=repr(exc))
                payload: dict[str, Any] = {
                    "ready": False,
                    "error": f"readiness check failed: {type(exc).__name__}",
                }
                return 503, json.dumps(payload).encode() + b"\n", "application/json"
            payload = {"ready": state.ready, **state.as_dict()}
            return (200 if state.ready else 503), json.dumps(payload).encode() + b"\n", "application/json"
        return 404, b"not found: try /metrics, /healthz, /readyz\n", "text/plain; charset=utf-8"

    @staticmethod
    async def _respond(
        writer: asyncio.StreamWriter, status: int, body: bytes, content_type: str, *, head_only: bool
    ) -> None:
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\n"
            "Connection: close\r\n\r\n"
        )
        writer.write(head.encode("latin-1") + (b"" if head_only else body))
        await writer.drain()
