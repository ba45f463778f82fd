"""The daemon as operators see it: /readyz, /metrics and systemd notify around a real worker."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import asyncpg
import httpx
import pytest

from imagen_worker.backends.mock import MockBackend
from imagen_worker.config import load_config
from imagen_worker.observability import metrics as m
from imagen_worker.observability.metrics import Readiness
from imagen_worker.worker.running import Event
from imagen_worker.worker.service import Service, record_metrics
from tests.workers import eventually, insert_job, terminal, write_config


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text output (0 when absent)."""
    wanted = ",".join(f'{key}="{value}"' for key, value in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture
def systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """The socket a unit's NOTIFY_SOCKET names, as systemd would read it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    yield sock
    sock.close()


async def test_a_running_service_is_ready_counts_its_jobs_and_talks_to_systemd(
    db: asyncpg.Pool, database_url: str, tmp_path: Path, systemd: socket.socket
) -> None:
    config = load_config(write_config(tmp_path, metrics={"enabled": True, "host": "127.0.0.1", "port": 0}))
    service = Service(config, database_url, run_migrations=False)
    running = asyncio.create_task(service.run())
    try:
        await eventually(lambda: _serving(service), within=20)
        base = f"http://127.0.0.1:{service.health.port}"  # type: ignore[union-attr]
        async with httpx.AsyncClient(base_url=base) as http:
            ready = await eventually(lambda: _ready(http), within=10)
            assert ready == {
                "ready": True, "database": True, "listener": True,
                "backends": {"mock": True}, "unavailable": {},
            }  # fmt: skip

            before = metric((await http.get("/metrics")).text, "imagen_jobs_finished_total",
                            backend="mock", outcome="done")  # fmt: skip
            job = await terminal(db, await insert_job(db, "a counted job"))
            assert job["status"] == "done"
            exposition = (await http.get("/metrics")).text
        after = metric(exposition, "imagen_jobs_finished_total", backend="mock", outcome="done")
        assert after == before + 1
        assert metric(exposition, "imagen_listener_connected") == 1
        assert metric(exposition, "imagen_output_writable") == 1
        assert metric(exposition, "imagen_pickup_latency_seconds_count", backend="mock") >= 1
    finally:
        service.worker.request_stop()
        await asyncio.wait_for(running, timeout=30)
    messages = _drain(systemd)
    assert "READY=1" in messages and "STOPPING=1" in messages
    assert messages.index("READY=1") < messages.index("STATUS=serving mock") < messages.index("STOPPING=1")
    assert messages[-1].startswith("STATUS=draining"), "the drain's line is not overwritten"


async def _serving(service: Service) -> bool:
    return service.health is not None and service.health.port != 0


async def _ready(http: httpx.AsyncClient) -> dict[str, object] | None:
    answer = await http.get("/readyz")
    return answer.json() if answer.status_code == 200 else None


def _drain(sock: socket.socket) -> list[str]:
    lines: list[str] = []
    while True:
        try:
            lines.extend(sock.recv(4096).decode().splitlines())
        except BlockingIOError:
            return lines


class Unavailable(MockBackend):
    @property
    def unavailable_reason(self) -> str | None:
        return "ComfyUI at http://gpu:8188 is unreachable"


async def test_readiness_and_systemd_name_each_unavailable_backend_and_its_reason(
    db: asyncpg.Pool, database_url: str, tmp_path: Path, systemd: socket.socket
) -> None:
    config = load_config(write_config(tmp_path, backends={"mock": {"type": "mock"}, "gpu": {"type": "mock"}}))
    service = Service(config, database_url, run_migrations=False, serve_metrics=False)
    running = asyncio.create_task(service.run())
    try:
        await eventually(lambda: _started(service), within=20)
        service.worker.backends["gpu"] = Unavailable.from_config("gpu", {"type": "mock"})
        state = await eventually(lambda: _reports(service, "gpu"), within=10)
        said = "STATUS=serving mock; gpu takes no work: ComfyUI at http://gpu:8188 is unreachable"
        seen: list[str] = []
        await eventually(lambda: _heard(systemd, seen, said), within=10)
    finally:
        service.worker.request_stop()
        await asyncio.wait_for(running, timeout=30)
    assert state.ready, "one available backend keeps the worker ready"
    assert state.backends == {"mock": True, "gpu": False}
    assert state.unavailable == {"gpu": "ComfyUI at http://gpu:8188 is unreachable"}
    assert seen.index("STATUS=serving gpu, mock") < seen.index(said), "systemd is told when it changes"


async def _heard(sock: socket.socket, seen: list[str], line: str) -> bool:
    seen.extend(_drain(sock))
    return line in seen


async def _started(service: Service) -> bool:
    return service.worker.ready.is_set()


async def _reports(service: Service, name: str) -> Readiness | None:
    state = await service.readiness()
    return state if name in state.unavailable and name in state.backends else None


def test_the_in_flight_gauge_comes_down_once_per_job_whatever_the_job_could_record() -> None:
    backend = f"gauge-{uuid.uuid4().hex[:6]}"
    job = SimpleNamespace(waited_seconds=0.0)
    gauge = m.JOBS_IN_FLIGHT.labels(backend=backend)

    for outcome in (Event.DONE, None, Event.RELEASED):  # None: a lease lost before any outcome
        record_metrics(Event.CLAIMED, {"backend": backend, "job": job})
        if outcome is not None:
            record_metrics(outcome, {"backend": backend, "job": job})
        record_metrics(Event.ENDED, {"backend": backend, "job": job})

    assert gauge._value.get() == 0
