"""GPU utilisation: the share of wall time a (fake) ComfyUI GPU is busy, lookahead 0 vs 1.

The fake ComfyUI server (``tests/fakes/comfyui.py``) runs in its own process and records its
GPU's busy intervals; every prompt takes a fixed ``gpu_ms`` of "GPU time". An in-process
``Worker`` (its own process: this one) serves a ``comfyui`` backend pointing at it (built-in
``sdxl`` template), with a storage sink that sleeps ``upload_ms`` per image before storing it
locally, the stand-in for a slow cloud upload. N jobs are enqueued at once, and then:

* ``busy share`` = sum of busy intervals / (end of the last - start of the first);
* ``idle gap`` = the time between one prompt's end and the next one's start on the GPU.

With ``lookahead: 0`` ComfyUI holds one of our prompts at a time; with ``lookahead: 1`` one
more waits in ComfyUI's own queue, so the GPU can go from one prompt straight to the next.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import multiprocessing as mp
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import asyncpg

from bench.common import (
    insert_jobs,
    machine_info,
    percentile,
    print_table,
    scratch_database,
    scratch_directory,
    write_result,
    write_worker_config,
)

NAME = "gpu_utilisation"


# --- the fake ComfyUI, in its own process --------------------------------------------------


def _fake_process(gpu_seconds: float, pipe: Connection) -> None:
    asyncio.run(_serve_fake(gpu_seconds, pipe))


async def _serve_fake(gpu_seconds: float, pipe: Connection) -> None:
    from tests.fakes.comfyui import FakeComfyUI

    fake = FakeComfyUI(default_duration=gpu_seconds)
    await fake.start()
    pipe.send(fake.url)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, pipe.recv)
    runs = [(run.start, run.end, run.outcome) for run in fake.executions]
    await fake.stop()
    pipe.send(runs)


# --- a slow sink -----------------------------------------------------------------------------


class SlowSink:
    """Wraps the real sink: sleeps ``delay`` seconds (the upload), then stores as usual."""

    def __init__(self, inner: Any, delay: float) -> None:
        self.inner = inner
        self.delay = delay

    async def put(self, key: str, source: Path, mime_type: str) -> Any:
        await asyncio.sleep(self.delay)
        return await self.inner.put(key, source, mime_type)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def measure(
    dsn: str, workdir: Path, jobs: int, gpu_ms: float, upload_ms: float, lookahead: int
) -> dict[str, Any]:
    import structlog

    from imagen_worker.config import load_config
    from imagen_worker.worker.daemon import Worker

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    ctx = mp.get_context("spawn")
    parent_end, child_end = ctx.Pipe()
    fake = ctx.Process(target=_fake_process, args=(gpu_ms / 1000, child_end), daemon=True)
    fake.start()
    loop = asyncio.get_running_loop()
    url = await loop.run_in_executor(None, parent_end.recv)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("TRUNCATE imagen.jobs, imagen.images, imagen.workers CASCADE")
        config_path = write_worker_config(
            workdir / f"lookahead-{lookahead}",
            backends={
                "comfyui": {"type": "comfyui", "base_url": url, "workflow": "sdxl", "lookahead": lookahead}
            },
            worker={"concurrency": 8, "poll_interval": 5.0},
        )
        import os

        os.environ["IMAGEN_CONFIG"] = str(config_path)
        os.environ["IMAGEN_CLOUD_SYNC"] = "off"
        worker = Worker(load_config(), dsn, run_migrations=False)
        original_start = worker.start

        async def start_with_slow_sink() -> None:
            await original_start()
            worker.pipeline.sink = SlowSink(worker.pipeline.sink, upload_ms / 1000)  # type: ignore[assignment]

        worker.start = start_with_slow_sink  # type: ignore[method-assign]
        task = asyncio.create_task(worker.run())
        await asyncio.wait_for(worker.ready.wait(), 30)
        started = time.monotonic()
        await insert_jobs(conn, jobs, backend="comfyui")
        while True:
            finished = await conn.fetchval(
                "SELECT count(*) FROM imagen.jobs WHERE status IN ('done', 'failed')"
            )
            if finished >= jobs or time.monotonic() - started > jobs * 2 + 60:
                break
            await asyncio.sleep(0.05)
        wall = time.monotonic() - started
        statuses = dict(await conn.fetch("SELECT status, count(*) FROM imagen.jobs GROUP BY status"))
        worker.request_stop()
        await asyncio.wait_for(task, 60)
    finally:
        await conn.close()
        parent_end.send("stop")
        runs = await loop.run_in_executor(None, parent_end.recv)
        fake.join(timeout=10)
        if fake.is_alive():
            fake.kill()
    spans = sorted((start, end) for start, end, outcome in runs if end is not None and outcome == "success")
    busy = sum(end - start for start, end in spans)
    window = spans[-1][1] - spans[0][0] if spans else float("nan")
    gaps = [max(0.0, b[0] - a[1]) for a, b in itertools.pairwise(spans)]
    return {
        "lookahead": lookahead,
        "jobs": jobs,
        "statuses": statuses,
        "prompts_run": len(spans),
        "busy_share": round(busy / window, 4) if spans else None,
        "window_seconds": round(window, 2),
        "wall_seconds": round(wall, 2),
        "jobs_per_second": round(jobs / wall, 2),
        "idle_gap_ms": {
            "p50": round(percentile(gaps, 50) * 1000, 2),
            "p95": round(percentile(gaps, 95) * 1000, 2),
            "max": round(max(gaps) * 1000, 2),
            "mean": round(sum(gaps) / len(gaps) * 1000, 2),
        }
        if gaps
        else {},
    }


async def run(jobs: int = 200, gpu_ms: float = 200.0, upload_ms: float = 150.0) -> dict[str, Any]:
    info = await machine_info()
    results = []
    async with scratch_database("bench_gpu") as dsn:
        with scratch_directory("imagen-bench-gpu-") as tmp:
            for lookahead in (0, 1):
                result = await measure(dsn, tmp, jobs, gpu_ms, upload_ms, lookahead)
                results.append(result)
                print(f"  lookahead {lookahead}: busy {result['busy_share']:.1%}", flush=True)
    print_table(
        f"Fake GPU utilisation ({jobs} jobs, {gpu_ms:.0f} ms GPU per prompt, "
        f"{upload_ms:.0f} ms upload per image)",
        [
            "lookahead",
            "busy share",
            "gap p50 ms",
            "gap p95 ms",
            "gap max ms",
            "jobs/s",
            "ideal jobs/s",
            "statuses",
        ],
        [
            (
                r["lookahead"],
                f"{r['busy_share']:.1%}",
                r["idle_gap_ms"].get("p50"),
                r["idle_gap_ms"].get("p95"),
                r["idle_gap_ms"].get("max"),
                r["jobs_per_second"],
                round(1000 / gpu_ms, 2),
                r["statuses"],
            )
            for r in results
        ],
    )
    out = {
        "machine": info,
        "parameters": {"jobs": jobs, "gpu_ms": gpu_ms, "upload_ms": upload_ms, "workflow": "sdxl (built-in)"},
        "results": results,
    }
    write_result(NAME, out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--gpu-ms", type=float, default=200.0)
    parser.add_argument("--upload-ms", type=float, default=150.0)
    args = parser.parse_args()
    asyncio.run(run(args.jobs, args.gpu_ms, args.upload_ms))


if __name__ == "__main__":
    main()
