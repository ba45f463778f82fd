"""Overhead: what the worker adds per job over a raw ComfyUI client, side by side in one run.

Both paths run the same tiny workflow (64x64 ``EmptyImage`` -> ``SaveImage``, a fresh colour
and file prefix per prompt, so ComfyUI's cache never answers) against the same ComfyUI, one
job at a time, alternating raw / worker / worker / raw ... so drift hits both alike:

* ``raw client``: one persistent websocket; ``POST /prompt``, wait for ``executing`` with
  ``node: null`` for that prompt, ``GET /history/<id>``, ``GET /view`` of the image. The clock
  runs from the POST until the image bytes are in memory.
* ``worker``: a real ``imagen-worker run`` subprocess (comfyui backend, concurrency 1, local
  storage) and a client that INSERTs the job (one autocommit statement) and waits for the
  ``imagen_job_events`` notification saying ``done``. The clock runs from the INSERT until that
  notification: pickup, the same ComfyUI round trips, the file write, the upload record and
  the final commit.

The difference of the two (p50, p95) is the worker's per-job overhead; the table of stage
timings (the images rows' ``sidecar.timings_ms``) says where it goes, and the floor (the three
commits a job's promises need, measured alone after the worker stopped, plus the disk's durable
write) says how much of it no code change can remove on this machine. By default ComfyUI is
the fake (``tests/fakes/comfyui.py``, in its own process, ``--gpu-ms`` per prompt);
``--comfyui-url`` measures a real server, ``--workflow`` takes another API-format graph whose
node "1" has a ``color`` input and node "2" a ``filename_prefix`` input.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import time
import uuid
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import websockets

from bench.common import (
    machine_info,
    print_table,
    scratch_database,
    scratch_directory,
    spawn_worker,
    stop_worker,
    summary_ms,
    wait_for_workers,
    worker_env,
    write_result,
    write_worker_config,
)

NAME = "overhead"
OWNER = uuid.UUID("00000000-0000-4000-8000-0000000b0e4d")
GRAPH: dict[str, Any] = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "imagen-bench"}},
}
# The pipeline always binds a prompt and a seed: the prompt lands in the saver's prefix (which
# the adapter then replaces with its own per-submission prefix), the seed is the colour.
BINDINGS = {"prompt": "2.filename_prefix", "seed": "1.color"}
INSERT_JOB = """
INSERT INTO imagen.jobs (owner_user_id, prompt, backend, width, height, seed)
VALUES ($1, 'overhead', 'comfyui', 64, 64, $2) RETURNING id
"""
COLUMNS = ("p50_ms", "p95_ms", "p99_ms", "mean_ms")
STAGES = ("pickup", "claim", "submit", "execute", "download", "write", "upload")
# Per job, the worker's time that no stage above covers: the INSERT's own round trip, the final
# statement and its commit, the notification back to the client, and the hand-offs between
# stages (task switches, the thread hop, log lines).
REST = "the rest"


# --- the fake ComfyUI, in its own process ----------------------------------------------------


def _fake_process(seconds: float, pipe: Connection) -> None:
    asyncio.run(_serve_fake(seconds, pipe))


async def _serve_fake(seconds: float, pipe: Connection) -> None:
    from tests.fakes.comfyui import FakeComfyUI

    fake = FakeComfyUI(default_duration=seconds)
    await fake.start()
    pipe.send(fake.url)
    await asyncio.get_running_loop().run_in_executor(None, pipe.recv)
    await fake.stop()


# --- the raw client ------------------------------------------------------------------------


class RawClient:
    """The least a program needs to run one prompt and hold its image."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.client_id = uuid.uuid4().hex
        self.http = httpx.AsyncClient(base_url=self.base_url, timeout=60)
        self._done: dict[str, asyncio.Future[None]] = {}
        self._socket: Any = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        ws_url = self.base_url.replace("http", "ws", 1) + f"/ws?clientId={self.client_id}"
        self._socket = await websockets.connect(ws_url, max_size=None)
        self._reader = asyncio.create_task(self._read())

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self._socket is not None:
            await self._socket.close()
        await self.http.aclose()

    async def _read(self) -> None:
        async for message in self._socket:
            if not isinstance(message, str):
                continue  # previews
            event = json.loads(message)
            data = event.get("data") or {}
            if event.get("type") == "executing" and data.get("node") is None:
                future = self._done.pop(str(data.get("prompt_id")), None)
                if future is not None and not future.done():
                    future.set_result(None)

    async def run(self, graph: dict[str, Any]) -> float:
        prompt_id = str(uuid.uuid4())
        done = asyncio.get_running_loop().create_future()
        self._done[prompt_id] = done
        started = time.perf_counter()
        body = {"prompt": graph, "client_id": self.client_id, "prompt_id": prompt_id}
        (await self.http.post("/prompt", json=body)).raise_for_status()
        await asyncio.wait_for(done, 60)
        history = (await self.http.get(f"/history/{prompt_id}")).json()[prompt_id]
        images = [image for out in history["outputs"].values() for image in out.get("images", [])]
        for image in images:
            params = {k: image[k] for k in ("filename", "subfolder", "type")}
            (await self.http.get("/view", params=params)).raise_for_status()
        elapsed = time.perf_counter() - started
        if not images:
            raise RuntimeError(f"prompt {prompt_id} saved no image")
        return elapsed


def fresh_graph(template: dict[str, Any]) -> dict[str, Any]:
    graph: dict[str, Any] = json.loads(json.dumps(template))
    graph["1"]["inputs"]["color"] = random.randrange(16_777_216)
    graph["2"]["inputs"]["filename_prefix"] = f"imagen-bench/raw/{uuid.uuid4().hex[:12]}"
    return graph


# --- the worker path ---------------------------------------------------------------------------


class WorkerPath:
    """INSERT a job and wait for the notification that says it is done."""

    def __init__(self, conn: asyncpg.Connection, listener: asyncpg.Connection) -> None:
        self.conn = conn
        self.listener = listener
        self._done: dict[str, asyncio.Future[float]] = {}
        self._early: dict[str, float] = {}

    async def start(self) -> None:
        await self.listener.add_listener("imagen_job_events", self._event)

    def _event(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        now = time.perf_counter()
        event = json.loads(payload)
        if event.get("status") not in ("done", "failed"):
            return
        future = self._done.pop(event["id"], None)
        if future is None:
            self._early[event["id"]] = now
        elif not future.done():
            future.set_result(now)

    async def run(self) -> tuple[float, uuid.UUID]:
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        started = time.perf_counter()
        job_id = await self.conn.fetchval(INSERT_JOB, OWNER, random.randrange(16_777_216))
        if str(job_id) in self._early:
            future.set_result(self._early.pop(str(job_id)))
        else:
            self._done[str(job_id)] = future
        finished = await asyncio.wait_for(future, 60)
        return finished - started, job_id


# --- the commits the promises need, alone --------------------------------------------------------

COMMITS = ("insert", "claim", "completion")
ALL = "all three"


async def commit_floor(dsn: str, jobs: int) -> dict[str, Any]:
    """The three commits a job's promises need, one job at a time on an idle database, through
    the worker's own statements and nothing else: the job's INSERT, the claim and the
    completion (the images row and ``done`` together). A first claim writes nothing before its
    POST (its prompt id is derived from the job id), so no backend ref is timed. No
    notification is waited for and no file written: this is what the worker's overhead cannot
    go below here, however little Python it runs."""
    from imagen_worker.db.connect import create_pool
    from imagen_worker.queue.jobs import ImageRecord, Queue

    pool = await create_pool(dsn, min_size=1, max_size=1, full_reset=False)
    queue = Queue(pool, uuid.uuid4())
    times: dict[str, list[float]] = {name: [] for name in (*COMMITS, ALL)}
    try:
        for _ in range(jobs):
            clock = [time.perf_counter()]
            await pool.fetchval(INSERT_JOB, OWNER, random.randrange(16_777_216))
            clock.append(time.perf_counter())
            [job] = await queue.claim("comfyui", is_default=False, limit=1, lease_seconds=60)
            clock.append(time.perf_counter())
            record = ImageRecord(
                storage_path=f"local:{OWNER}/{job.id}.png", mime_type="image/png", bytes=200,
                sha256="0" * 64, backend="comfyui", seed=1, latency_ms=10, sidecar={"floor": True},
                width=64, height=64, thumbnail_path=f"local:{OWNER}/{job.id}.thumb.webp",
            )  # fmt: skip
            [outcome] = await queue.complete_many([(job, record)])
            clock.append(time.perf_counter())
            if outcome.image_id is None:
                raise RuntimeError(f"floor job {job.id} was not recorded")
            for name, start, end in zip(COMMITS, clock, clock[1:], strict=False):
                times[name].append(end - start)
            times[ALL].append(clock[-1] - clock[0])
    finally:
        await pool.close()
    return {name: summary_ms(values) for name, values in times.items()}


# --- one run -----------------------------------------------------------------------------------


def disk_floor(directory: Path, files: int = 200) -> dict[str, Any]:
    """What this machine's file system costs right now, in the worker's output directory: a
    new file (create, write 200 bytes, close) and a durable one (the same, then fsync, rename,
    fsync of the directory: the image's write). A job creates four files (five with an output
    too large to download into memory) and makes one durable; on this virtual machine creating
    a file has measured 15 us and, for minutes at a time, 650 us, so the write and download
    stages move with it. Its files stay until the directory goes: removed right before the
    jobs, they made each of the jobs' new files slower (docs/performance.md, Findings, 37)."""
    directory.mkdir(parents=True, exist_ok=True)
    created: list[float] = []
    durable: list[float] = []
    body = b"x" * 200
    stamp = uuid.uuid4().hex[:8]
    for i in range(files):
        path = directory / f".floor-{stamp}-{i}"
        started = time.perf_counter()
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(handle, body)
        os.close(handle)
        created.append(time.perf_counter() - started)
        started = time.perf_counter()
        handle = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(handle, body)
        os.fsync(handle)
        os.close(handle)
        os.replace(path.with_suffix(".tmp"), path.with_suffix(".done"))
        folder = os.open(directory, os.O_RDONLY)
        os.fsync(folder)
        os.close(folder)
        durable.append(time.perf_counter() - started)
    return {"create": summary_ms(created), "durable_write": summary_ms(durable)}


async def measure(
    url: str, jobs: int, warmup: int, template: dict[str, Any], workdir: Path
) -> dict[str, Any]:
    workflow = workdir / "workflow.json"
    workflow.write_text(json.dumps(template), encoding="utf-8")
    raw_times: list[float] = []
    worker_times: list[float] = []
    worker_jobs: list[uuid.UUID] = []
    floor_dir = workdir / "worker" / "images"
    floors = {"before": await asyncio.to_thread(disk_floor, floor_dir)}
    async with scratch_database("bench_overhead") as dsn:
        config = write_worker_config(
            workdir / "worker",
            backends={
                "comfyui": {
                    "type": "comfyui",
                    "base_url": url,
                    "workflow": str(workflow),
                    "bindings": BINDINGS,
                }
            },
            worker={"concurrency": 1, "poll_interval": 5.0},
        )
        proc = spawn_worker(worker_env(dsn, config), workdir / "worker.log")
        conn = await asyncpg.connect(dsn)
        listener = await asyncpg.connect(dsn)
        raw = RawClient(url)
        try:
            await wait_for_workers(conn, 1, timeout=60)
            await raw.start()
            path = WorkerPath(conn, listener)
            await path.start()
            await asyncio.sleep(1.0)
            for i in range(warmup + jobs):
                order = ("raw", "worker") if i % 2 == 0 else ("worker", "raw")
                for which in order:
                    if which == "raw":
                        elapsed = await raw.run(fresh_graph(template))
                        if i >= warmup:
                            raw_times.append(elapsed)
                    else:
                        elapsed, job_id = await path.run()
                        if i >= warmup:
                            worker_times.append(elapsed)
                            worker_jobs.append(job_id)
            rows = await conn.fetch(
                "SELECT j.id, j.status, j.error, i.sidecar, extract(epoch FROM j.started_at - j.created_at)"
                "::float8 AS pickup FROM imagen.jobs j LEFT JOIN imagen.images i"
                " ON i.id = j.image_id WHERE j.id = ANY($1::uuid[])",
                worker_jobs,
            )
        finally:
            await raw.close()
            stop_worker(proc)
            await listener.close()
            await conn.close()
        commits = await commit_floor(dsn, jobs)
    floors["after"] = await asyncio.to_thread(disk_floor, floor_dir)
    failed = [row["error"] for row in rows if row["status"] != "done"]
    if failed:
        raise RuntimeError(f"{len(failed)} worker jobs did not end done, e.g. {failed[0]}")
    stages: dict[str, list[float]] = {stage: [] for stage in (*STAGES, REST)}
    elapsed_by_job = dict(zip(worker_jobs, worker_times, strict=True))
    for row in rows:
        stages["pickup"].append(row["pickup"])
        sidecar = json.loads(row["sidecar"]) if isinstance(row["sidecar"], str) else row["sidecar"]
        timings = {stage: ms / 1000 for stage, ms in sidecar.get("timings_ms", {}).items()}
        for stage in STAGES[1:]:
            if stage in timings:
                stages[stage].append(timings[stage])
        accounted = row["pickup"] + sum(timings.get(stage, 0.0) for stage in STAGES[1:])
        stages[REST].append(elapsed_by_job[row["id"]] - accounted)
    return {"raw": summary_ms(raw_times), "worker": summary_ms(worker_times),
            "stages": {stage: summary_ms(values) for stage, values in stages.items() if values},
            "disk_floor": floors, "commit_floor": commits}  # fmt: skip


async def run(
    jobs: int = 300, warmup: int = 20, gpu_ms: float = 10.0, comfyui_url: str | None = None,
    workflow: Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    info = await machine_info()
    template = json.loads(workflow.read_text(encoding="utf-8")) if workflow else GRAPH
    fake = None
    pipe: Connection | None = None
    url = comfyui_url
    if url is None:
        ctx = mp.get_context("spawn")
        pipe, child = ctx.Pipe()
        fake = ctx.Process(target=_fake_process, args=(gpu_ms / 1000, child), daemon=True)
        fake.start()
        url = str(await asyncio.get_running_loop().run_in_executor(None, pipe.recv))
    try:
        with scratch_directory("imagen-bench-overhead-") as tmp:
            result = await measure(url, jobs, warmup, template, tmp)
    finally:
        if fake is not None and pipe is not None:
            pipe.send("stop")
            fake.join(timeout=10)
            if fake.is_alive():
                fake.kill()
    raw, worker = result["raw"], result["worker"]
    target = comfyui_url or f"fake ComfyUI, {gpu_ms:g} ms per prompt"
    rows = [
        ("raw client", *(raw[k] for k in COLUMNS)),
        ("worker (INSERT -> done)", *(worker[k] for k in COLUMNS)),
    ]
    rows.append(("overhead (worker - raw)", *(round(worker[k] - raw[k], 3) for k in COLUMNS)))
    print_table(f"Per-job time, {jobs} jobs each, alternating ({target})",
                ["path", "p50 ms", "p95 ms", "p99 ms", "mean ms"], rows)  # fmt: skip
    print_table(
        "Where the worker's time goes (pickup: the claim's now() - the INSERT's; the stages: "
        "images.sidecar.timings_ms; the rest: per job, what neither covers: the INSERT's round "
        "trip, the final commit, the notification, hand-offs)",
        ["stage", "p50 ms", "p95 ms"],
        [(stage, s["p50_ms"], s["p95_ms"]) for stage, s in result["stages"].items()],
    )
    print_table(
        "This machine's disk in the output directory, before and after the jobs (see disk_floor)",
        ["when", "create p50 ms", "create p95 ms", "durable write p50 ms", "durable write p95 ms"],
        [
            (when, f["create"]["p50_ms"], f["create"]["p95_ms"], f["durable_write"]["p50_ms"],
             f["durable_write"]["p95_ms"])
            for when, f in result["disk_floor"].items()
        ],
    )  # fmt: skip
    print_table(
        "The commits a job's promises need, alone, one job at a time after the worker stopped "
        "(see commit_floor)",
        ["commit", "p50 ms", "p95 ms"],
        [(name, c["p50_ms"], c["p95_ms"]) for name, c in result["commit_floor"].items()],
    )
    overhead = round(worker["p50_ms"] - raw["p50_ms"], 3)
    floor = round(
        result["commit_floor"][ALL]["p50_ms"] + result["disk_floor"]["after"]["durable_write"]["p50_ms"],
        3,
    )
    print(f"  overhead at p50: {overhead} ms (goal: <= 3 ms)")
    print(f"  floor at p50: {floor} ms (the three commits and the image's durable write)")
    out = {
        "machine": info,
        "parameters": {"jobs": jobs, "warmup": warmup, "comfyui": target, "workflow": template},
        "overhead_p50_ms": overhead,
        "floor_p50_ms": floor,
        **result,
    }
    write_result(NAME if comfyui_url is None else f"{NAME}_real_comfyui", out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--gpu-ms", type=float, default=10.0, help="the fake's time per prompt")
    parser.add_argument("--comfyui-url", help="a real ComfyUI instead of the fake")
    parser.add_argument(
        "--workflow", type=Path, help="an API-format graph (default: 64x64 EmptyImage -> SaveImage)"
    )
    args = parser.parse_args()
    asyncio.run(run(args.jobs, args.warmup, args.gpu_ms, args.comfyui_url, args.workflow))


if __name__ == "__main__":
    main()
