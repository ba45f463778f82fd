"""Reading the planner's choices: a statement that must stay cheap at any backlog is checked
by its plan, which does not vary with the machine's speed as a timing would."""

from __future__ import annotations

import contextlib
from typing import Any

import asyncpg


async def explain(
    conn: asyncpg.Connection, statement: str, *args: Any, plan_cache_mode: str
) -> dict[str, Any]:
    """The plan of ``statement`` (not run), planned as a custom or a generic plan."""
    async with conn.transaction():
        await conn.execute(f"SET LOCAL plan_cache_mode = {plan_cache_mode}")
        (explained,) = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {statement}", *args)
    plan: dict[str, Any] = explained["Plan"]
    return plan


def relations_read_in_full(plan: dict[str, Any]) -> list[str]:
    """Every table the plan scans sequentially."""
    found = [str(plan["Relation Name"])] if plan.get("Node Type") == "Seq Scan" else []
    for child in plan.get("Plans", []):
        found += relations_read_in_full(child)
    return found


def node_types(plan: dict[str, Any]) -> list[str]:
    """Every node of the plan, by type (``"Sort"``, ``"Index Scan"``, ...)."""
    return [str(plan["Node Type"])] + [kind for child in plan.get("Plans", []) for kind in node_types(child)]


def subplan(plan: dict[str, Any], name: str) -> dict[str, Any]:
    """The node of a named subplan (a CTE: ``"CTE named"``)."""
    if plan.get("Subplan Name") == name:
        return plan
    for child in plan.get("Plans", []):
        with contextlib.suppress(LookupError):
            return subplan(child, name)
    raise LookupError(name)
