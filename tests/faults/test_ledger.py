"""The execution ledger catches what the scenarios must rule out: overlaps and unfinished runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.faults.ledger import overlapping, read_ledger


def write(path: Path, *entries: dict[str, Any]) -> Path:
    with path.open("a", encoding="utf-8") as ledger:
        for entry in entries:
            ledger.write(json.dumps({"backend": "gpu", **entry}) + "\n")
    return path


def run(
    job: str, attempt: int, pid: int, start: float, end: float | None, outcome: str = "ok"
) -> list[dict[str, Any]]:
    key = {"job": job, "attempt": attempt, "pid": pid}
    lines = [{"event": "start", "t": start, **key}]
    if end is not None:
        lines.append({"event": "end", "t": end, "outcome": outcome, **key})
    return lines


def test_runs_of_one_job_at_the_same_time_overlap_even_on_one_worker(tmp_path: Path) -> None:
    ledger = write(
        tmp_path / "ledger.jsonl",
        *run("a", 1, 10, 0.0, 5.0, "cancelled"),
        *run("a", 2, 10, 4.0, 9.0),  # the same worker took its own job again while rendering it
        *run("b", 1, 10, 0.0, 1.0, "cancelled"),
        *run("b", 2, 11, 1.0, 2.0),  # handed over cleanly: one ends as the next starts
    )
    executions = read_ledger(ledger)
    assert [(e.job, e.attempt, e.outcome) for e in executions] == [
        ("a", 1, "cancelled"), ("b", 1, "cancelled"), ("b", 2, "ok"), ("a", 2, "ok"),
    ]  # fmt: skip
    pairs = overlapping(executions)
    assert [(a.job, a.attempt, b.attempt) for a, b in pairs] == [("a", 1, 2)]


def test_a_run_that_never_ended_overlaps_everything_after_it(tmp_path: Path) -> None:
    ledger = write(tmp_path / "ledger.jsonl", *run("a", 1, 10, 0.0, None), *run("a", 2, 11, 100.0, 101.0))
    executions = read_ledger(ledger)
    assert executions[0].end is None and executions[0].outcome == "open"
    assert len(overlapping(executions)) == 1
