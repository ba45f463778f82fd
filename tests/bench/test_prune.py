"""The prune benchmark removes exactly its old rows and times claims beside it."""

from __future__ import annotations

from bench.prune import scenario


async def test_the_daily_prune_scenario_removes_one_job_in_twelve_and_times_the_claims_beside_it(
    database_url: str,
) -> None:
    result = await scenario("daily prune", 1200, 12, 0, baseline=0.2)

    assert (result["rows"], result["removed"]) == (1200, 100)
    assert result["claim_idle"]["n"] > 0 and result["claim_during_prune"]["n"] > 0
    assert result["prune_seconds"] > 0 and result["removed_per_second"] > 0
