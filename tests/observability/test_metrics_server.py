"""Metric names and labels, and the /metrics, /healthz, /readyz endpoints over real HTTP."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import asyncpg
import pytest

from imagen_worker.observability import metrics as m
from imagen_worker.observability.metrics import HealthServer, Metrics, Readiness

EXPECTED = {
    # name as collected (counters without _total) -> (type, label names)
    "imagen_jobs_claimed": ("counter", ("backend",)),
    "imagen_jobs_finished": ("counter", ("backend", "outcome")),
    "imagen_pickup_latency_seconds": ("histogram", ("backend",)),
    "imagen_stage_duration_seconds": ("histogram", ("backend", "stage")),
    "imagen_queue_depth": ("gauge", ("status",)),
    "imagen_jobs_in_flight": ("gauge", ("backend",)),
    "imagen_listener_reconnects": ("counter", ()),
    "imagen_listener_connected": ("gauge", ()),
    "imagen_backend_healthy": ("gauge", ("backend",)),
    "imagen_backend_outages": ("counter", ("backend",)),
    "imagen_storage_waits": ("counter", ("backend",)),
    "imagen_output_writable": ("gauge", ()),
    "imagen_webhook_deliveries": ("counter", ("outcome",)),
}


def test_exact_names_types_and_labels() -> None:
    metrics = Metrics()
    collected = {family.name: family.type for family in metrics.registry.collect()}
    assert collected == {name: kind for name, (kind, _) in EXPECTED.items()}
    for attr in vars(metrics).values():
        if hasattr(attr, "_labelnames"):
            name = attr._name.removesuffix("_total")
            assert tuple(attr._labelnames) == EXPECTED[name][1]


def test_module_objects_share_one_private_registry() -> None:
    from prometheus_client import REGISTRY as GLOBAL

    assert m.REGISTRY is m.METRICS.registry is not GLOBAL
    assert m.JOBS_CLAIMED is m.METRICS.jobs_claimed
    assert GLOBAL.get_sample_value("imagen_jobs_claimed_total", {"backend": "mock"}) is None
    # A second instance registers the same names without "Duplicated timeseries".
    Metrics()


def test_pickup_buckets_span_1ms_to_60s() -> None:
    assert m.PICKUP_BUCKETS[0] == 0.001 and m.PICKUP_BUCKETS[-1] == 60


def test_prime_creates_zero_series_for_every_label_value() -> None:
    metrics = Metrics()
    metrics.prime(["mock"])
    body = metrics.exposition()[0].decode()
    for outcome in m.OUTCOMES:
        assert f'imagen_jobs_finished_total{{backend="mock",outcome="{outcome}"}} 0.0' in body
    for stage in m.STAGES:
        assert f'imagen_stage_duration_seconds_count{{backend="mock",stage="{stage}"}} 0.0' in body
    assert 'imagen_queue_depth{status="pending"} 0.0' in body


async def test_refresh_queue_depth_counts_pending_and_running(db: asyncpg.Pool) -> None:
    owner = "00000000-0000-0000-0000-000000000001"
    await db.execute(
        "INSERT INTO imagen.jobs (owner_user_id, prompt) SELECT $1::uuid, 'p' FROM generate_series(1, 3)",
        owner,
    )
    await db.execute(
        "INSERT INTO imagen.jobs (owner_user_id, prompt, status, lease_expires_at) "
        "VALUES ($1::uuid, 'r', 'running', now() + interval '1 minute')",
        owner,
    )
    metrics = Metrics()
    await metrics.refresh_queue_depth(db)
    assert metrics.registry.get_sample_value("imagen_queue_depth", {"status": "pending"}) == 3
    assert metrics.registry.get_sample_value("imagen_queue_depth", {"status": "running"}) == 1


async def test_a_slow_queue_depth_count_is_repeated_less_often(
    db: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The count reads every live row: one that took 0.3 s (a backlog of about a million jobs)
    # is not repeated for 30 s, so counting takes at most 1% of the time.
    clock = iter([100.0, 100.3])
    monkeypatch.setattr(m, "monotonic", lambda: next(clock))
    assert await Metrics().refresh_queue_depth(db) == pytest.approx(30.0)


class _Probe:
    """A readiness callback the test can flip."""

    def __init__(self) -> None:
        self.state = Readiness(database=True, listener=True, backends={"mock": True})
        self.error: Exception | None = None
        self.delay = 0.0

    async def __call__(self) -> Readiness:
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return self.state


@pytest.fixture
async def served() -> AsyncIterator[tuple[str, _Probe, Metrics]]:
    probe, metrics = _Probe(), Metrics()
    server = HealthServer("127.0.0.1", 0, probe, metrics=metrics, readiness_timeout=0.3)
    port = await server.start()
    assert port > 0
    try:
        yield f"http://127.0.0.1:{port}", probe, metrics
    finally:
        await server.stop()


Get = Callable[[str], Awaitable[tuple[int, str, str]]]


async def _get(url: str, method: str = "GET") -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as session, session.request(method, url) as response:
        return response.status, response.headers.get("Content-Type", ""), await response.text()


async def test_healthz(served: tuple[str, _Probe, Metrics]) -> None:
    base, _, _ = served
    assert await _get(base + "/healthz") == (200, "text/plain; charset=utf-8", "ok\n")


async def test_readyz_follows_the_callback(served: tuple[str, _Probe, Metrics]) -> None:
    base, probe, _ = served
    status, content_type, body = await _get(base + "/readyz")
    assert (status, content_type) == (200, "application/json")
    assert json.loads(body) == {
        "ready": True, "database": True, "listener": True, "backends": {"mock": True}, "unavailable": {}
    }  # fmt: skip

    probe.state = Readiness(database=True, listener=False, backends={"mock": True})
    status, _, body = await _get(base + "/readyz")
    assert status == 503 and json.loads(body)["listener"] is False

    probe.state = Readiness(database=True, listener=True, backends={"mock": False, "comfy": False})
    assert (await _get(base + "/readyz"))[0] == 503

    probe.state = Readiness(database=True, listener=True, backends={"mock": False, "comfy": True})
    assert (await _get(base + "/readyz"))[0] == 200

    down = "ComfyUI at http://gpu:8188 is unreachable"
    probe.state = Readiness(True, True, backends={"comfy": False}, unavailable={"comfy": down})
    status, _, body = await _get(base + "/readyz")
    assert status == 503 and json.loads(body)["unavailable"] == {"comfy": down}


async def test_readyz_is_503_when_the_callback_fails_or_hangs(served: tuple[str, _Probe, Metrics]) -> None:
    base, probe, _ = served
    probe.error = ConnectionRefusedError("postgresql://u:secret@db/x refused")
    status, _, body = await _get(base + "/readyz")
    assert status == 503 and "secret" not in body
    assert json.loads(body) == {"ready": False, "error": "readiness check failed: ConnectionRefusedError"}
    probe.error, probe.delay = None, 1.0
    status, _, body = await _get(base + "/readyz")
    assert status == 503 and "TimeoutError" in body


async def test_metrics_exposes_what_was_recorded(served: tuple[str, _Probe, Metrics]) -> None:
    base, _, metrics = served
    metrics.jobs_claimed.labels(backend="mock").inc()
    metrics.jobs_finished.labels(backend="mock", outcome="done").inc()
    metrics.pickup_latency.labels(backend="mock").observe(0.004)
    metrics.stage_duration.labels(backend="mock", stage="generate").observe(1.5)
    metrics.listener_connected.set(1)
    status, content_type, body = await _get(base + "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    assert 'imagen_jobs_claimed_total{backend="mock"} 1.0' in body
    assert 'imagen_jobs_finished_total{backend="mock",outcome="done"} 1.0' in body
    assert 'imagen_pickup_latency_seconds_bucket{backend="mock",le="0.005"} 1.0' in body
    assert 'imagen_stage_duration_seconds_sum{backend="mock",stage="generate"} 1.5' in body
    assert "imagen_listener_connected 1.0" in body
    for name, (kind, _) in EXPECTED.items():
        exposed = f"{name}_total" if kind == "counter" else name
        assert f"# TYPE {exposed} {kind}\n" in body


async def test_unknown_paths_methods_and_head(served: tuple[str, _Probe, Metrics]) -> None:
    base, _, _ = served
    assert (await _get(base + "/nope"))[0] == 404
    assert (await _get(base + "/healthz", "POST"))[0] == 405
    status, _, body = await _get(base + "/healthz", "HEAD")
    assert status == 200 and body == ""
    assert (await _get(base + "/healthz?verbose=1"))[0] == 200


async def test_garbage_request_gets_400_and_server_keeps_serving(served: tuple[str, _Probe, Metrics]) -> None:
    base, _, _ = served
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"NONSENSE\r\n\r\n")
    await writer.drain()
    assert (await reader.read()).startswith(b"HTTP/1.1 400 ")
    writer.close()
    assert (await _get(base + "/healthz"))[0] == 200


async def test_stop_frees_the_port() -> None:
    server = HealthServer("127.0.0.1", 0, _Probe(), metrics=Metrics())
    port = await server.start()
    await server.stop()
    await server.stop()  # idempotent
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
