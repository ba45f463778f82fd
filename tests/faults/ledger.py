"""Reading the recording backend's ledger, and the verdict every fault scenario must pass.

The verdict is the same for every fault: each job ``done`` with exactly one ``imagen.images``
row pointing back, exactly one execution that produced an image, no two executions of one job
overlapping in time (on any worker), no execution left open, and the attempts the scenario
expects.
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import asyncpg


@dataclass
class Execution:
    job: str
    attempt: int | None
    pid: int
    backend: str
    start: float
    end: float | None = None
    outcome: str = "open"

    def overlaps(self, other: Execution) -> bool:
        mine_end = self.end if self.end is not None else float("inf")
        other_end = other.end if other.end is not None else float("inf")
        return self.start < other_end and other.start < mine_end


def read_ledger(path: Path) -> list[Execution]:
    """Executions in start order; an end line closes the oldest open start with the same key."""
    executions: list[Execution] = []
    open_by_key: dict[tuple[str, int | None, int, str], list[Execution]] = defaultdict(list)
    if not path.exists():
        return executions
    for line in path.read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        key = (entry["job"], entry["attempt"], entry["pid"], entry["backend"])
        if entry["event"] == "start":
            run = Execution(entry["job"], entry["attempt"], entry["pid"], entry["backend"], entry["t"])
            executions.append(run)
            open_by_key[key].append(run)
        elif open_by_key[key]:
            run = open_by_key[key].pop(0)
            run.end, run.outcome = entry["t"], entry["outcome"]
    return sorted(executions, key=lambda run: run.start)


def overlapping(executions: Iterable[Execution]) -> list[tuple[Execution, Execution]]:
    """Pairs of executions of the same job that ran at the same time."""
    by_job: dict[str, list[Execution]] = defaultdict(list)
    for run in executions:
        by_job[run.job].append(run)
    return [(a, b) for runs in by_job.values() for a, b in itertools.combinations(runs, 2) if a.overlaps(b)]


Expected = Callable[[uuid.UUID], int | tuple[int, ...]]


async def assert_each_done_exactly_once(
    db: asyncpg.Pool,
    ledger: Path | list[Execution],
    jobs: Iterable[uuid.UUID],
    *,
    attempts: int | tuple[int, ...] | Expected = 1,
) -> list[Execution]:
    """The verdict of every scenario; returns the executions for scenario-specific checks.

    ``ledger`` is the recording backend's file, or executions gathered elsewhere (the fake
    ComfyUI's GPU); ``attempts`` is what each job's ``attempts`` must end as.
    """
    job_ids = list(jobs)
    rows = {
        row["id"]: row
        for row in await db.fetch(
            "SELECT j.id, j.status, j.error, j.attempts, j.image_id, "
            "       (SELECT count(*) FROM imagen.images i WHERE i.job_id = j.id) AS images "
            "FROM imagen.jobs j WHERE j.id = ANY($1::uuid[])",
            job_ids,
        )
    }
    problems: list[str] = []
    missing = [job for job in job_ids if job not in rows]
    if missing:
        problems.append(f"{len(missing)} jobs are gone, e.g. {missing[0]}")
    not_done = {job: (row["status"], row["error"]) for job, row in rows.items() if row["status"] != "done"}
    if not_done:
        sample = list(not_done.items())[:3]
        problems.append(f"{len(not_done)} of {len(job_ids)} jobs are not done: {sample}")
    wrong_images = {job: row["images"] for job, row in rows.items() if row["images"] != 1}
    if wrong_images:
        problems.append(f"jobs without exactly one images row: {list(wrong_images.items())[:3]}")
    executions = read_ledger(ledger) if isinstance(ledger, Path) else ledger
    ours = {str(job) for job in job_ids}
    runs = [run for run in executions if run.job in ours]
    ok_count: dict[str, int] = defaultdict(int)
    for run in runs:
        if run.outcome == "ok":
            ok_count[run.job] += 1
    not_once = {job: ok_count.get(str(job), 0) for job in job_ids if ok_count.get(str(job), 0) != 1}
    if not_once:
        problems.append(f"jobs not rendered exactly once (job: renders): {list(not_once.items())[:3]}")
    still_open = [run for run in runs if run.end is None]
    if still_open:
        problems.append(f"{len(still_open)} executions never ended, e.g. {still_open[0]}")
    doubles = overlapping(runs)
    if doubles:
        a, b = doubles[0]
        problems.append(
            f"{len(doubles)} pairs of executions of one job overlapped, e.g. job {a.job}: "
            f"attempt {a.attempt} on pid {a.pid} [{a.start:.2f}, {a.end}] and "
            f"attempt {b.attempt} on pid {b.pid} [{b.start:.2f}, {b.end}]"
        )
    unexpected = []
    for job, row in rows.items():
        want = attempts(job) if callable(attempts) else attempts
        allowed = want if isinstance(want, tuple) else (want,)
        if row["attempts"] not in allowed:
            unexpected.append(f"{job}: {row['attempts']} (expected {want})")
    if unexpected:
        problems.append(f"{len(unexpected)} jobs ended with unexpected attempts, e.g. {unexpected[:3]}")
    assert not problems, "\n".join(problems)
    return runs
