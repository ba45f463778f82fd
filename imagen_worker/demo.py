"""``make demo``: the whole product end to end on the embedded default.

Starts ``imagen-worker run`` with no configuration (embedded PostgreSQL, mock backend, local
storage), enqueues one job with ``imagen submit --wait``, one with a plain SQL INSERT the way
the web UI does, and a batch of four WebP images with ``imagen submit -n 4 --format webp``,
prints the image paths, rows and thumbnails, and stops the worker with SIGTERM.

Everything lives in a throwaway directory (its own embedded server, its own images), so the
demo never touches the user's queue; the server is stopped and its data deleted at the end.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from rich.console import Console
from rich.table import Table

from imagen_worker import output
from imagen_worker.cli.watch import TERMINAL
from imagen_worker.config import data_dir
from imagen_worker.db import embedded
from imagen_worker.db.connect import connect, embedded_dsn
from imagen_worker.queries import sql
from imagen_worker.queue.jobs import Queue

console = Console()
BIN = Path(sys.executable).parent
SUBMIT_WITHIN = 120.0  # seconds; each of the demo's jobs takes about one
WEB_UI_INSERT = """INSERT INTO imagen.jobs (owner_user_id, prompt, style, width, height)
VALUES ($1, 'a lighthouse on a cliff at dawn', 'watercolor', 768, 512)
RETURNING id"""
BATCH_QUERY = """SELECT index, storage_path, thumbnail_path, mime_type, width, height, bytes
FROM imagen.images WHERE job_id = $1 ORDER BY index"""


def _use_scratch_directory() -> Path:
    """A fresh data directory for this process and its children: the demo's own queue."""
    scratch = Path(tempfile.mkdtemp(prefix="imagen-demo-"))
    for name in list(os.environ):
        if name.startswith(("IMAGEN_", "SUPABASE_")) or name == "DATABASE_URL":
            del os.environ[name]
    os.environ["XDG_DATA_HOME"] = str(scratch)
    config = scratch / "imagen.yaml"
    config.write_text("# the demo runs on the defaults\n", encoding="utf-8")
    os.environ["IMAGEN_CONFIG"] = str(config)
    os.environ["IMAGEN_CLOUD_SYNC"] = "off"
    return scratch


def _discard_database() -> None:
    """Stop the demo's embedded server and delete its data; the images stay to look at."""
    embedded.stop()
    shutil.rmtree(embedded.default_directory(), ignore_errors=True)


async def _wait_for_worker(dsn: str, worker: subprocess.Popen[bytes], within: float = 60) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise SystemExit(f"demo: the worker exited early with code {worker.returncode}")
        try:
            conn = await connect(dsn)
            try:
                ready = await conn.fetchval(sql("worker_alive"), worker.pid)
            finally:
                await conn.close()
            if ready:
                return
        except Exception:
            pass
        await asyncio.sleep(0.2)
    raise SystemExit("demo: the worker did not start within a minute")


async def _show_when_done(dsn: str, job_id: uuid.UUID, within: float = 30) -> bool:
    """Wait for the job, then print its row and its image row; True when it is done."""
    conn = await connect(dsn)
    try:
        deadline = time.monotonic() + within
        job = await Queue(conn).get(job_id)
        while job is not None and job["status"] not in TERMINAL and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            job = await Queue(conn).get(job_id)
        if job is None or job["status"] not in TERMINAL:
            raise SystemExit(f"demo: job {job_id} did not finish")
        image = await conn.fetchrow(sql("get_image"), job["image_id"]) if job["image_id"] else None
    finally:
        await conn.close()
    job_keys = ("id", "status", "prompt", "style", "width", "height", "seed", "attempts", "error", "image_id")
    image_keys = ("id", "storage_path", "mime_type", "bytes", "sha256", "latency_ms", "backend", "model")
    for title, row, keys in (("imagen.jobs", job, job_keys), ("imagen.images", image, image_keys)):
        if row is None:
            continue
        table = Table(title=title, show_header=False, title_justify="left")
        for key in keys:
            table.add_row(key, str(row[key]))
        console.print(table)
    console.print("pickup (created_at -> started_at):", str(job["started_at"] - job["created_at"]))
    if image is not None:
        console.print("local file:", image["local_path"], soft_wrap=True)
    else:
        console.print(f"[red]job {job['status']}: {job['error']}")
    return bool(job["status"] == "done")


async def _show_batch(dsn: str, paths: list[str]) -> bool:
    """The batch's images rows, each with its thumbnail on disk beside the image."""
    conn = await connect(dsn)
    try:
        job_id = await conn.fetchval(
            "SELECT job_id FROM imagen.images i JOIN imagen.image_internals n ON n.image_id = i.id "
            "WHERE n.local_path = $1",
            paths[0],
        )
        rows = await conn.fetch(BATCH_QUERY, job_id)
    finally:
        await conn.close()
    console.print(f"imagen.images of job {job_id} (one row per image, index 0 is jobs.image_id):")
    for row in rows:
        console.print(
            f"  {row['index']}  {row['mime_type']}  {row['width']}x{row['height']}  {row['bytes']} B  "
            f"{row['storage_path']}  thumbnail {row['thumbnail_path']}",
            soft_wrap=True, highlight=False,
        )  # fmt: skip
    thumbs = [output.thumbnail_path(Path(p)) for p in paths]
    for thumb in thumbs:
        console.print("thumbnail:", str(thumb), f"({thumb.stat().st_size} bytes)", soft_wrap=True)
    return len(rows) == 4 and all(thumb.is_file() for thumb in thumbs)


async def _insert_like_the_web_ui(dsn: str) -> uuid.UUID:
    conn = await connect(dsn)
    try:
        job_id: uuid.UUID = await conn.fetchval(WEB_UI_INSERT, uuid.uuid4())
        return job_id
    finally:
        await conn.close()


def _submit(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str] | None:
    """``imagen submit`` as a user runs it; None, said in words, when it did not finish in time
    (the worker's log above says why it does not take the job, e.g. a full disk)."""
    try:
        return subprocess.run(
            [str(BIN / "imagen"), "submit", *args],
            env=env, capture_output=True, text=True, check=False, timeout=SUBMIT_WITHIN,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        console.print(
            f"[red]imagen submit did not finish within {SUBMIT_WITHIN:g} s; the worker's log above says why"
        )
        return None


def main() -> int:
    console.rule("[bold]imagen-worker demo")
    scratch = _use_scratch_directory()
    console.print(f"Starting a throwaway embedded PostgreSQL in {scratch} (a few seconds)...")
    try:
        return _run_demo()
    finally:
        _discard_database()


def _run_demo() -> int:
    dsn = embedded_dsn()
    env = dict(os.environ)
    worker = subprocess.Popen(
        [str(BIN / "imagen-worker"), "run", "--no-metrics", "--log-format", "console"], env=env
    )
    try:
        asyncio.run(_wait_for_worker(dsn, worker))
        console.rule("1. imagen submit --wait")
        submitted = _submit(
            ["a red fox in fresh snow", "--style", "photo", "--size", "512x512", "--wait"], env
        )
        if submitted is None:
            return 1
        sys.stderr.write(submitted.stderr)
        if submitted.returncode != 0:
            console.print(f"[red]imagen submit failed ({submitted.returncode})")
            return 1
        console.print("image:", submitted.stdout.strip(), soft_wrap=True)

        console.rule("2. a plain SQL INSERT, as the web UI does")
        console.print(WEB_UI_INSERT)
        job_id = asyncio.run(_insert_like_the_web_ui(dsn))
        if not asyncio.run(_show_when_done(dsn, job_id)):
            return 1

        console.rule("3. a batch: imagen submit -n 4 --format webp --wait")
        batch = _submit(
            ["a paper boat on a pond", "--size", "512x384", "-n", "4", "--format", "webp",
             "--quality", "80", "--wait"],
            env,
        )  # fmt: skip
        if batch is None:
            return 1
        sys.stderr.write(batch.stderr)
        paths = batch.stdout.split()
        if batch.returncode != 0 or len(paths) != 4:
            console.print(f"[red]imagen submit -n 4 failed ({batch.returncode})")
            return 1
        for path in paths:
            console.print("image:", path, soft_wrap=True)
        if not asyncio.run(_show_batch(dsn, paths)):
            return 1
    finally:
        console.rule("4. SIGTERM: the worker drains and exits")
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(timeout=90)
        console.print(f"worker exited with code {code}")
    console.print("[bold green]demo complete.[/] Images live in", str(data_dir() / "images"), soft_wrap=True)
    console.print("Your own queue was not touched; the demo's database is deleted now.")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
