"""Delivery outcomes on the service's /metrics, as Prometheus scrapes them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import httpx

from imagen_worker.config import load_config
from imagen_worker.worker.service import Service
from tests.webhooks.conftest import Receiver, hooks_block
from tests.worker.test_service import metric
from tests.workers import eventually, insert_job, write_config


async def test_retried_and_delivered_attempts_are_counted(
    outbox_db: asyncpg.Pool, database_url: str, tmp_path: Path, receiver: Receiver, secret: str
) -> None:
    receiver.script = [503]
    config = load_config(write_config(
        tmp_path, metrics={"enabled": True, "host": "127.0.0.1", "port": 0},
        webhooks=hooks_block(receiver.url),
    ))  # fmt: skip
    service = Service(config, database_url, run_migrations=False)
    running = asyncio.create_task(service.run())
    try:
        await eventually(lambda: _serving(service), within=20)
        base = f"http://127.0.0.1:{service.health.port}"  # type: ignore[union-attr]
        async with httpx.AsyncClient(base_url=base) as http:
            before = {o: await _count(http, o) for o in ("delivered", "retried", "failed")}
            await insert_job(outbox_db)
            await eventually(lambda: _received(receiver, 2))
            await eventually(lambda: _grown(http, "delivered", before["delivered"]))
            after = {o: await _count(http, o) for o in ("delivered", "retried", "failed")}
    finally:
        service.worker.request_stop()
        await asyncio.wait_for(running, timeout=30)

    assert after == {
        "delivered": before["delivered"] + 1, "retried": before["retried"] + 1, "failed": before["failed"]
    }  # fmt: skip


async def _serving(service: Service) -> bool:
    return service.health is not None and service.health.port != 0


async def _received(receiver: Receiver, count: int) -> bool:
    return len(receiver.requests) >= count


async def _count(http: httpx.AsyncClient, outcome: str) -> float:
    text = (await http.get("/metrics")).text
    return metric(text, "imagen_webhook_deliveries_total", outcome=outcome)


async def _grown(http: httpx.AsyncClient, outcome: str, before: float) -> bool:
    return await _count(http, outcome) > before
