"""The throughput benchmark's rounds and its goal ratios."""

from __future__ import annotations

from typing import Any

from bench.throughput import round_order, round_ratios


def _run(round_: int, system: str, rate: float, processes: int = 1) -> dict[str, Any]:
    return {"round": round_, "system": system, "processes": processes, "jobs_per_second": rate}


def test_every_other_round_runs_the_systems_in_reverse_order() -> None:
    systems = ("imagen", "imagen-queue", "pgqueuer")

    assert [round_order(systems, r) for r in range(3)] == [
        systems,
        ("pgqueuer", "imagen-queue", "imagen"),
        systems,
    ]


def test_a_goal_ratio_pairs_the_two_systems_of_each_round() -> None:
    results = [
        _run(0, "imagen-queue", 100.0), _run(0, "pgqueuer", 200.0),
        _run(1, "imagen-queue", 300.0), _run(1, "pgqueuer", 200.0),
        _run(1, "imagen-queue", 999.0, processes=4),
    ]  # fmt: skip

    assert round_ratios(results, 1, "imagen-queue", "pgqueuer") == [0.5, 1.5]


def test_a_round_missing_either_system_gives_no_ratio() -> None:
    results = [_run(0, "imagen-queue", 100.0), _run(1, "imagen-queue", 100.0), _run(1, "pgqueuer", 50.0)]

    assert round_ratios(results, 1, "imagen-queue", "pgqueuer") == [2.0]
