"""Chaos run: workers killed, restarted, cut off, blocked and left without a backend or Storage.

Worker processes are killed and restarted, database paths blackholed, rows locked, the backend
and Storage taken down, listener connections terminated and PostgreSQL restarted while several
hundred jobs with random failures go through the queue.

Three ``imagen-worker run`` subprocesses, each reaching PostgreSQL through its own fault proxy
(``tests/faults/proxy.py``), serve a recording backend (``tests/faults/recording.py``: latency,
a random retryable failure rate, and a ledger of every execution with its start and end), lease
3 s, and upload to Supabase Storage (the Storage API fake of ``tests/fakes/storage.py``, served
by this process). Jobs are inserted in bursts during the first half of the run. Meanwhile:

* every few seconds a random worker gets SIGKILL and is started again;
* rolling restarts: each worker in turn gets SIGTERM, stays down longer than a poll interval
  and comes back, as in a deploy;
* blackholes: one worker's database path forwards nothing for longer than the lease, then heals;
* lock holders: a client holds ``SELECT ... FOR UPDATE`` on a running job's row for longer than
  the lease;
* backend outages: the backend says it is down and its running renders die, then it is back;
* Storage outages: the Storage server stops listening (connections refused), then is back;
* listener connections are ended with ``pg_terminate_backend``;
* once, PostgreSQL itself is restarted with ``pg_ctlcluster`` where this process has the rights
  (skipped otherwise, and said so).

Then every job must reach a terminal state and the invariants below must hold:

* none lost: every inserted job is still there, and every one is terminal;
* none completed twice: at most one ``imagen.images`` row per job, exactly one for every done
  job (and ``jobs.image_id`` points at it), none for a job that is not done;
* none rendered twice at once: no two executions of one job overlap in time (an execution cut
  short by SIGKILL ends when its process was killed), and none is left open;
* none wrongly failed: the only failed jobs are those told to fail (``fail: terminal``);
* images rows == done jobs;
* Storage holds exactly the images rows: its objects are the ``storage_path`` and
  ``thumbnail_path`` of the images rows, no more, no fewer.

``make chaos`` runs ``python -m bench.chaos``; ``tests/chaos/test_chaos_short.py`` runs a short
variant of the same code in ``make test``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from bench.common import (
    kill_worker,
    scratch_database,
    server_dsn,
    spawn_worker,
    stop_worker,
    worker_env,
    write_result,
    write_worker_config,
)
from tests.fakes.storage import FakeStorage
from tests.faults.ledger import overlapping, read_ledger
from tests.faults.proxy import FaultProxy
from tests.faults.recording import subprocess_env

T = TypeVar("T")

LISTENER_CONNECTIONS = """
SELECT pid FROM pg_stat_activity
WHERE datname = current_database() AND application_name = 'imagen-worker listener'
"""


@dataclass
class ChaosOptions:
    jobs: int = 400
    workers: int = 3
    duration: float = 60.0
    kill_every: float = 4.0
    listener_kills: int = 3
    restart_postgres: bool = True
    fail_rate: float = 0.15
    terminal_share: float = 0.03
    latency_ms: float = 150.0
    lease_seconds: float = 3.0
    max_attempts: int = 6
    settle_timeout: float = 180.0
    seed: int | None = None
    poll_interval: float = 1.0
    rolling_restarts: int = 1
    down_seconds: float = 2.0  # each worker of a rolling restart; more than a poll interval
    blackholes: int = 1
    blackhole_seconds: float = 8.0  # more than two leases
    lock_holds: int = 1
    lock_seconds: float = 30.0
    backend_outages: int = 1
    outage_seconds: float = 10.0
    storage_outages: int = 1
    storage_outage_seconds: float = 8.0  # longer than a job's attempts would last (retries 0.2-1 s)


@dataclass
class ChaosReport:
    options: dict[str, Any]
    kills: int = 0
    restarts: int = 0
    listener_terminations: int = 0
    listener_reconnects_logged: int = 0
    postgres_restarted: bool = False
    postgres_restart_note: str = ""
    jobs_inserted: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    images: int = 0
    storage_objects: int = 0
    storage_waits_logged: int = 0
    attempts: dict[str, int] = field(default_factory=dict)
    failure_reasons: dict[str, int] = field(default_factory=dict)
    lease_lost_logged: int = 0
    rolling_restarts: int = 0
    graceful_restarts: int = 0
    blackholes: int = 0
    lock_holds: int = 0
    backend_outages: int = 0
    storage_outages: int = 0
    executions: int = 0
    overlapping_executions: int = 0
    open_executions: int = 0
    lost: int = 0
    double: int = 0
    wrongly_failed: int = 0
    seconds: float = 0.0
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    @property
    def faults(self) -> int:
        """Every fault injected: kills, graceful restarts, blackholes, lock holds, outages,
        listener terminations and a PostgreSQL restart."""
        return (
            self.kills + self.graceful_restarts + self.blackholes + self.lock_holds + self.backend_outages
            + self.storage_outages + self.listener_terminations + int(self.postgres_restarted)
        )  # fmt: skip


# --- PostgreSQL restart ------------------------------------------------------------------------


async def postgres_restart_command(dsn: str) -> tuple[list[str] | None, str]:
    """The pg_ctlcluster command that restarts this server, or None and why not."""
    if os.name != "posix" or os.geteuid() != 0:
        return None, "not root: cannot restart PostgreSQL"
    tool = shutil.which("pg_ctlcluster")
    if tool is None:
        return None, "pg_ctlcluster not found (not a Debian-style PostgreSQL)"
    conn = await asyncpg.connect(dsn)
    try:
        cluster = await conn.fetchval("SHOW cluster_name")
        data_dir = await conn.fetchval("SELECT setting FROM pg_settings WHERE name = 'data_directory'")
    finally:
        await conn.close()
    if not cluster or "/" not in cluster or not Path(data_dir).is_dir():
        return None, f"server is not a local pg_ctlcluster cluster (cluster_name={cluster!r})"
    version, name = cluster.split("/", 1)
    return [tool, "--skip-systemctl-redirect", version, name, "restart", "-m", "fast"], f"cluster {cluster}"


# --- the run -------------------------------------------------------------------------------------


class Chaos:
    def __init__(self, options: ChaosOptions, dsn: str, workdir: Path) -> None:
        self.options = options
        self.dsn = dsn
        self.workdir = workdir
        self.rng = random.Random(options.seed)
        self.storage = FakeStorage()
        self.logs = workdir / "logs"
        self.ledger = workdir / "ledger.jsonl"
        self.down_file = workdir / "backend-down"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.proxies: list[FaultProxy] = []
        self.kill_times: dict[int, float] = {}
        self.maintenance: set[int] = set()  # workers a rolling restart is cycling: not killed
        self.inserted: list[uuid.UUID] = []
        self.terminal_jobs: set[uuid.UUID] = set()
        self.report = ChaosReport(options=asdict(options))
        config = write_worker_config(
            workdir,
            backends={
                "gpu": {
                    "type": "recording",
                    "ledger": str(self.ledger),
                    "latency_ms": options.latency_ms,
                    "fail_rate": options.fail_rate,
                    "capacity": 4,
                    "down_file": str(self.down_file),
                }
            },
            storage={"type": "supabase", "max_retries": 1},
            output={"cloud_sync": "on"},
            worker={
                "concurrency": 4,
                "lease_seconds": options.lease_seconds,
                "poll_interval": options.poll_interval,
                "retry_base_seconds": 0.2,
                "retry_max_seconds": 1.0,
                "shutdown_grace": 5.0,
            },
        )
        self.config_path = config
        self.entry_points = subprocess_env(workdir / "entry-points")

    async def connect(self, *, timeout: float = 60.0) -> asyncpg.Connection:
        """A fresh connection, retried while PostgreSQL restarts."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                conn: asyncpg.Connection = await asyncpg.connect(self.dsn, timeout=5)
                return conn
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.3)

    async def _retried(self, operation: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """Run ``operation`` on a fresh connection, again while PostgreSQL restarts."""
        for attempt in range(20):
            conn = await self.connect()
            try:
                return await operation(conn)
            except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
                    asyncpg.CannotConnectNowError, asyncpg.AdminShutdownError):  # fmt: skip
                if attempt == 19:
                    raise
                await asyncio.sleep(0.5)
            finally:
                with contextlib.suppress(Exception):
                    await conn.close()
        raise AssertionError("unreachable")

    async def query(self, statement: str, *args: Any) -> list[asyncpg.Record]:
        async def fetch(conn: asyncpg.Connection) -> list[asyncpg.Record]:
            rows: list[asyncpg.Record] = await conn.fetch(statement, *args)
            return rows

        return await self._retried(fetch)

    def _spawn(self, index: int) -> subprocess.Popen[bytes]:
        storage = {"SUPABASE_URL": self.storage.url, "SUPABASE_SERVICE_KEY": self.storage.service_key}
        env = worker_env(
            self.proxies[index].dsn(self.dsn), self.config_path, **self.entry_points, **storage,
            IMAGEN_CLOUD_SYNC="on",
        )  # fmt: skip
        return spawn_worker(env, self.logs / f"worker-{index}.log")

    def _kill(self, index: int) -> None:
        proc = self.procs[index]
        if proc.poll() is None:
            self.kill_times[proc.pid] = time.time()
        kill_worker(proc)

    async def insert_batch(self, count: int) -> None:
        owner = uuid.uuid4()
        rows = []
        for i in range(count):
            terminal = self.rng.random() < self.options.terminal_share
            params = {"fail": "terminal"} if terminal else {}
            job_id = uuid.uuid4()
            if terminal:
                self.terminal_jobs.add(job_id)
            rows.append((job_id, owner, f"chaos job {len(self.inserted) + i}", json.dumps(params)))

        async def insert(conn: asyncpg.Connection) -> None:
            await conn.executemany(
                """INSERT INTO imagen.jobs
                       (id, owner_user_id, prompt, width, height, params, max_attempts)
                   VALUES ($1, $2, $3, 64, 64, $4::jsonb, $5)
                   ON CONFLICT (id) DO NOTHING""",
                [(*row, self.options.max_attempts) for row in rows],
            )

        await self._retried(insert)
        self.inserted.extend(row[0] for row in rows)

    async def terminate_listeners(self) -> int:
        rows = await self.query(
            f"SELECT pid, pg_terminate_backend(pid) AS ok FROM ({LISTENER_CONNECTIONS}) l"
        )
        return sum(1 for row in rows if row["ok"])

    async def restart_postgres(self) -> None:
        command, note = await postgres_restart_command(server_dsn())
        self.report.postgres_restart_note = note
        if command is None:
            print(f"  skipping the PostgreSQL restart: {note}", flush=True)
            return
        result = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            self.report.postgres_restart_note = f"{note}: restart failed: {result.stderr.strip()[:300]}"
            print(f"  PostgreSQL restart failed: {result.stderr.strip()[:300]}", flush=True)
            return
        self.report.postgres_restarted = True
        print(f"  restarted PostgreSQL ({note})", flush=True)

    # --- the faults that take a while run as their own tasks ---------------------------

    async def rolling_restart(self) -> None:
        """SIGTERM each worker in turn; it stays down ``down_seconds`` and comes back."""
        for index in range(len(self.procs)):
            while index in self.maintenance:  # the kill loop is restarting this one
                await asyncio.sleep(0.05)
            self.maintenance.add(index)
            try:
                await asyncio.to_thread(stop_worker, self.procs[index], timeout=30)
                await asyncio.sleep(self.options.down_seconds)
                self.procs[index] = self._spawn(index)
                self.report.graceful_restarts += 1
                await asyncio.sleep(self.options.down_seconds)  # let it boot and work a little
            finally:
                self.maintenance.discard(index)
        self.report.rolling_restarts += 1

    async def blackhole(self) -> None:
        proxy = self.proxies[self.rng.randrange(len(self.proxies))]
        proxy.blackhole()
        self.report.blackholes += 1
        try:
            await asyncio.sleep(self.options.blackhole_seconds)
        finally:
            proxy.restore()

    async def hold_lock(self) -> None:
        """Hold a running job's row with ``SELECT ... FOR UPDATE`` for ``lock_seconds``."""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            conn = await self.connect()
            try:
                async with conn.transaction():
                    locked = await conn.fetchval(
                        "SELECT id FROM imagen.jobs WHERE status = 'running' LIMIT 1 FOR UPDATE"
                    )
                    if locked is not None:
                        self.report.lock_holds += 1
                        await asyncio.sleep(self.options.lock_seconds)
                        return
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                pass  # PostgreSQL restarted under us: try again
            finally:
                with contextlib.suppress(Exception):
                    await conn.close()
            await asyncio.sleep(0.2)

    async def backend_outage(self) -> None:
        self.down_file.touch()
        self.report.backend_outages += 1
        try:
            await asyncio.sleep(self.options.outage_seconds)
        finally:
            self.down_file.unlink(missing_ok=True)

    async def storage_outage(self) -> None:
        await self.storage.go_down()
        self.report.storage_outages += 1
        try:
            await asyncio.sleep(self.options.storage_outage_seconds)
        finally:
            await self.storage.come_back()

    def _schedule(self) -> list[asyncio.Task[None]]:
        """Each long fault once per requested count, at a random moment of the run."""
        opts = self.options
        faults: list[Callable[[], Awaitable[None]]] = [
            *[self.rolling_restart] * opts.rolling_restarts,
            *[self.blackhole] * opts.blackholes,
            *[self.hold_lock] * opts.lock_holds,
            *[self.backend_outage] * opts.backend_outages,
            *[self.storage_outage] * opts.storage_outages,
        ]

        async def later(at: float, fault: Callable[[], Awaitable[None]]) -> None:
            await asyncio.sleep(at)
            await fault()

        return [
            asyncio.create_task(later(self.rng.uniform(0.1, 0.5) * opts.duration, fault)) for fault in faults
        ]

    async def run(self) -> ChaosReport:
        opts = self.options
        started = time.monotonic()
        await self.storage.start()
        self.proxies = [FaultProxy.for_dsn(self.dsn) for _ in range(opts.workers)]
        for proxy in self.proxies:
            proxy.start()
        faults: list[asyncio.Task[None]] = []
        try:
            self.procs = [self._spawn(i) for i in range(opts.workers)]
            await self._wait_registered(opts.workers)
            faults = self._schedule()
            batches = 8
            insert_at = [opts.duration * 0.5 * i / batches for i in range(batches)]
            per_batch = [opts.jobs // batches + (1 if i < opts.jobs % batches else 0) for i in range(batches)]
            listener_at = sorted(
                self.rng.uniform(0.15, 0.85) * opts.duration for _ in range(opts.listener_kills)
            )
            restart_at = opts.duration * 0.55 if opts.restart_postgres else None
            next_kill = opts.kill_every * self.rng.uniform(0.7, 1.3)
            while (now := time.monotonic() - started) < opts.duration:
                while insert_at and now >= insert_at[0]:
                    insert_at.pop(0)
                    await self.insert_batch(per_batch.pop(0))
                if now >= next_kill:
                    # A worker in a restart is not killed; another one is, so the kills keep
                    # their pace whatever the other faults are doing.
                    candidates = [i for i in range(len(self.procs)) if i not in self.maintenance]
                    if candidates:
                        victim = self.rng.choice(candidates)
                        self.maintenance.add(victim)
                        try:
                            self._kill(victim)
                            self.report.kills += 1
                            await asyncio.sleep(self.rng.uniform(0.1, 1.0))
                            self.procs[victim] = self._spawn(victim)
                            self.report.restarts += 1
                        finally:
                            self.maintenance.discard(victim)
                    next_kill = now + opts.kill_every * self.rng.uniform(0.7, 1.3)
                if listener_at and now >= listener_at[0]:
                    listener_at.pop(0)
                    self.report.listener_terminations += await self.terminate_listeners()
                if restart_at is not None and now >= restart_at:
                    restart_at = None
                    await self.restart_postgres()
                await asyncio.sleep(0.1)
            for batch in per_batch:  # a duration too short for all bursts: insert the rest now
                await self.insert_batch(batch)
            await asyncio.gather(*faults)
            for index, proc in enumerate(self.procs):
                if proc.poll() is not None:
                    self.procs[index] = self._spawn(index)
            await self._wait_terminal(opts.settle_timeout)
        finally:
            for task in faults:
                task.cancel()
            await asyncio.gather(*faults, return_exceptions=True)
            for proxy in self.proxies:
                proxy.restore()
            await asyncio.gather(*(asyncio.to_thread(stop_worker, proc, timeout=15) for proc in self.procs))
            for proxy in self.proxies:
                proxy.close()
            self.down_file.unlink(missing_ok=True)
            await self.storage.close()  # its objects stay in memory for the check
        self.report.seconds = round(time.monotonic() - started, 1)
        await self.check()
        return self.report

    async def _wait_registered(self, count: int) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            rows = await self.query("SELECT count(*) AS n FROM imagen.workers WHERE expires_at > now()")
            if rows[0]["n"] >= count:
                return
            await asyncio.sleep(0.1)
        raise TimeoutError("the workers did not register within 60 s")

    async def _wait_terminal(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = await self.query(
                "SELECT count(*) AS n FROM imagen.jobs WHERE status NOT IN ('done', 'failed', 'cancelled')"
            )
            if rows[0]["n"] == 0:
                return
            await asyncio.sleep(0.25)

    async def check(self) -> None:
        report = self.report
        violations = report.violations
        report.jobs_inserted = len(self.inserted)
        jobs = await self.query("SELECT id, status, attempts, error, image_id FROM imagen.jobs")
        images = await self.query("SELECT id, job_id, storage_path, thumbnail_path FROM imagen.images")
        report.statuses = dict(Counter(row["status"] for row in jobs))
        report.images = len(images)
        report.attempts = {str(k): v for k, v in sorted(Counter(row["attempts"] for row in jobs).items())}
        report.failure_reasons = dict(
            Counter((row["error"] or "")[:80] for row in jobs if row["status"] == "failed").most_common(8)
        )
        ids = {row["id"] for row in jobs}
        lost = set(self.inserted) - ids
        report.lost = len(lost) + sum(
            1 for row in jobs if row["status"] not in ("done", "failed", "cancelled")
        )
        wrongly = [row for row in jobs if row["status"] == "failed" and row["id"] not in self.terminal_jobs]
        report.wrongly_failed = len(wrongly)
        if wrongly:
            violations.append(
                f"{len(wrongly)} jobs failed that were not told to, e.g. {wrongly[0]['error']!r}"
            )
        self.check_ledger()
        if lost:
            violations.append(f"{len(lost)} inserted jobs are missing, e.g. {sorted(map(str, lost))[:3]}")
        if len(jobs) != len(self.inserted):
            violations.append(f"{len(jobs)} job rows for {len(self.inserted)} inserted jobs")
        open_jobs = [row for row in jobs if row["status"] not in ("done", "failed", "cancelled")]
        if open_jobs:
            violations.append(
                f"{len(open_jobs)} jobs are not terminal: {dict(Counter(r['status'] for r in open_jobs))}"
            )
        per_job = Counter(row["job_id"] for row in images)
        twice = {job_id: n for job_id, n in per_job.items() if n > 1}
        report.double = len(twice) + report.overlapping_executions
        if twice:
            violations.append(f"{len(twice)} jobs have more than one images row")
        if None in per_job:
            violations.append(f"{per_job[None]} images rows belong to no job")
        image_by_id = {row["id"]: row for row in images}
        done = [row for row in jobs if row["status"] == "done"]
        for row in done:
            image = image_by_id.get(row["image_id"])
            if per_job.get(row["id"], 0) != 1 or image is None or image["job_id"] != row["id"]:
                violations.append(f"done job {row['id']} does not have exactly one images row pointing back")
        not_done = {row["id"] for row in jobs if row["status"] != "done"}
        orphans = [row for row in images if row["job_id"] in not_done]
        if orphans:
            violations.append(f"{len(orphans)} images rows belong to jobs that are not done")
        if len(images) != len(done):
            violations.append(f"{len(images)} images rows but {len(done)} done jobs")
        objects = {key for _bucket, key in self.storage.objects}
        report.storage_objects = len(objects)
        if self.storage.errors:
            violations.append(f"the Storage fake raised inside a handler: {self.storage.errors[0]!r}")
        paths = {row["storage_path"] for row in images}
        paths |= {row["thumbnail_path"] for row in images if row["thumbnail_path"]}  # beside each image
        if objects != paths:
            stray, missing = objects - paths, paths - objects
            violations.append(
                f"storage has {len(objects)} objects for {len(paths)} images rows: "
                f"{len(stray)} stray (e.g. {sorted(stray)[:3]}), "
                f"{len(missing)} missing (e.g. {sorted(missing)[:3]})"
            )
        for log in self.logs.glob("*.log"):
            text = log.read_text(encoding="utf-8", errors="replace")
            report.listener_reconnects_logged += text.count("listener connection lost")
            report.lease_lost_logged += text.count("lease lost")
            report.storage_waits_logged += text.count("storage does not take the file")

    def check_ledger(self) -> None:
        """No two executions of one job overlapped; a SIGKILLed one ended at its kill."""
        report = self.report
        executions = read_ledger(self.ledger)
        for run in executions:
            if run.end is None and run.pid in self.kill_times:
                run.end, run.outcome = self.kill_times[run.pid], "killed"
        report.executions = len(executions)
        still_open = [run for run in executions if run.end is None]
        report.open_executions = len(still_open)
        if still_open:
            report.violations.append(f"{len(still_open)} executions never ended, e.g. {still_open[0]}")
        pairs = overlapping(executions)
        report.overlapping_executions = len({a.job for a, _ in pairs})
        if pairs:
            a, b = pairs[0]
            report.violations.append(
                f"{report.overlapping_executions} jobs rendered twice at the same time, e.g. job {a.job}: "
                f"attempt {a.attempt} on pid {a.pid} and attempt {b.attempt} on pid {b.pid}"
            )


async def run_chaos(options: ChaosOptions, workdir: Path | None = None) -> ChaosReport:
    """One chaos run in a scratch database (dropped afterwards); returns the report."""
    async with scratch_database("chaos") as dsn:
        if workdir is not None:
            return await Chaos(options, dsn, workdir).run()
        with tempfile.TemporaryDirectory(prefix="imagen-chaos-") as tmp:
            return await Chaos(options, dsn, Path(tmp)).run()


def print_report(report: ChaosReport) -> None:
    print("\nChaos run")
    for key in ("seconds", "jobs_inserted", "kills", "restarts", "rolling_restarts", "graceful_restarts",
                "blackholes", "lock_holds", "backend_outages", "storage_outages", "storage_waits_logged",
                "listener_terminations", "listener_reconnects_logged", "postgres_restarted",
                "postgres_restart_note", "faults", "statuses", "images", "storage_objects", "attempts",
                "executions", "overlapping_executions", "lease_lost_logged", "failure_reasons", "lost",
                "double", "wrongly_failed"):  # fmt: skip
        print(f"  {key:28s} {getattr(report, key)}")
    checks = [
        "every job terminal",
        "no job lost",
        "no job completed twice (<= 1 images row per job; exactly 1 per done job)",
        "no job rendered twice at the same time (execution ledger)",
        "no job failed that was not told to",
        "images rows == done jobs",
        "storage objects == images rows",
    ]
    if report.ok:
        for check in checks:
            print(f"  PASS {check}")
    else:
        for violation in report.violations:
            print(f"  FAIL {violation}")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of chaos (then settle)")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--kill-every", type=float, default=4.0)
    parser.add_argument("--listener-kills", type=int, default=3)
    parser.add_argument("--no-postgres-restart", action="store_true")
    parser.add_argument("--fail-rate", type=float, default=0.15)
    parser.add_argument("--latency-ms", type=float, default=150.0)
    parser.add_argument("--rolling-restarts", type=int, default=1)
    parser.add_argument("--blackholes", type=int, default=1)
    parser.add_argument("--blackhole-seconds", type=float, default=8.0)
    parser.add_argument("--lock-holds", type=int, default=1)
    parser.add_argument("--lock-seconds", type=float, default=30.0)
    parser.add_argument("--backend-outages", type=int, default=1)
    parser.add_argument("--outage-seconds", type=float, default=10.0)
    parser.add_argument("--storage-outages", type=int, default=1)
    parser.add_argument("--storage-outage-seconds", type=float, default=8.0)
    parser.add_argument("--seed", type=int)
    parser.add_argument(
        "--keep", type=Path, help="keep the logs, the ledger and the images in this directory"
    )
    args = parser.parse_args()
    options = ChaosOptions(
        jobs=args.jobs, workers=args.workers, duration=args.duration, kill_every=args.kill_every,
        listener_kills=args.listener_kills, restart_postgres=not args.no_postgres_restart,
        fail_rate=args.fail_rate, latency_ms=args.latency_ms, seed=args.seed,
        rolling_restarts=args.rolling_restarts, blackholes=args.blackholes,
        blackhole_seconds=args.blackhole_seconds, lock_holds=args.lock_holds, lock_seconds=args.lock_seconds,
        backend_outages=args.backend_outages, outage_seconds=args.outage_seconds,
        storage_outages=args.storage_outages, storage_outage_seconds=args.storage_outage_seconds,
    )  # fmt: skip
    report = asyncio.run(run_chaos(options, args.keep))
    print_report(report)
    write_result("chaos", {**asdict(report), "faults": report.faults, "ok": report.ok})
    raise SystemExit(0 if report.ok else 1)


if __name__ == "__main__":
    main()
