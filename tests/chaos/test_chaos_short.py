"""A short chaos run in ``make test``: the code of ``bench/chaos.py`` with smaller numbers.

Three real ``imagen-worker run`` processes, ~150 jobs with random retryable failures and some
terminal ones, at least two SIGKILLs of a worker (restarted each time), one round of
``pg_terminate_backend`` on the listener connections, a rolling restart, a 4 s blackhole of one
worker's database path (lease 3 s), a row lock held for 5 s, a 3 s backend outage and an 8 s
Storage outage (longer than a job's attempts would last); no PostgreSQL restart (other tests
share the server). Afterwards every invariant of the full run
must hold: all jobs terminal, none lost, none completed twice, none rendered twice at the same
time, none wrongly failed, images rows == done jobs, storage objects == images rows.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.chaos import ChaosOptions, print_report, run_chaos

pytestmark = pytest.mark.slow


async def test_short_chaos_run_keeps_every_invariant(
    server_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMAGEN_BENCH_DATABASE_URL", server_dsn)
    options = ChaosOptions(
        jobs=150,
        workers=3,
        duration=24.0,
        kill_every=7.0,
        listener_kills=1,
        restart_postgres=False,
        fail_rate=0.15,
        latency_ms=100.0,
        settle_timeout=30.0,
        seed=7,
        rolling_restarts=1,
        down_seconds=1.5,
        blackholes=1,
        blackhole_seconds=4.0,
        lock_holds=1,
        lock_seconds=5.0,
        backend_outages=1,
        outage_seconds=3.0,
        storage_outages=1,
        storage_outage_seconds=8.0,
    )
    report = await run_chaos(options, tmp_path)
    print_report(report)

    assert report.violations == []
    assert report.jobs_inserted == 150
    assert sum(report.statuses.values()) == 150
    # Every image is stored with its thumbnail beside it: two objects per done job.
    assert report.statuses.get("done", 0) == report.images and report.storage_objects == 2 * report.images
    assert report.executions >= report.images, "every render is in the execution ledger"
    assert report.lost == report.double == report.wrongly_failed == report.overlapping_executions == 0
    # The chaos really happened: workers died and came back, listeners were cut and reconnected.
    assert report.kills >= 2
    assert report.restarts == report.kills
    assert report.listener_terminations >= 1
    assert report.listener_reconnects_logged >= 1
    # ...and the long faults: a rolling restart of all three, a blackhole, a lock holder, outages
    # of the backend and of Storage, during which finished jobs waited instead of failing.
    assert report.rolling_restarts == 1 and report.graceful_restarts == 3
    assert report.blackholes == report.lock_holds == report.backend_outages == report.storage_outages == 1
    assert report.storage_waits_logged >= 1
