"""Housekeeping: jobs that ended and settled webhook deliveries, older than a cutoff, go.

The queue itself never deletes: a job's row is its owner's history, and how long to keep it is
the operator's call (``imagen prune --older-than 30d``, from a daily timer). Rows go in batches,
each its own short statement, so a first prune of a large table never holds one long
transaction, and rows a session has locked are skipped for the next run. Pending and running
jobs are never touched; images stay (their ``job_id`` becomes NULL): they are the owners'
gallery, and their objects stay in Storage.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg

from imagen_worker.queries import sql

BATCH = 5000
DELIVERIES = "webhook deliveries"


@dataclass
class Pruned:
    jobs: Counter[str] = field(default_factory=Counter)  # by final status
    deliveries: int = 0

    def describe(self) -> str:
        """``1,234 jobs (cancelled 4, done 1,200, failed 30) and 56 webhook deliveries``."""
        total = sum(self.jobs.values())
        text = f"{total:,} job{'' if total == 1 else 's'}"
        if total:
            text += " (" + ", ".join(f"{status} {n:,}" for status, n in sorted(self.jobs.items())) + ")"
        return f"{text} and {self.deliveries:,} webhook deliver{'y' if self.deliveries == 1 else 'ies'}"


async def prune(conn: asyncpg.Connection, before: datetime, *, batch: int = BATCH) -> Pruned:
    pruned = Pruned()
    while True:
        rows = await conn.fetch(sql("prune_jobs"), before, batch)
        pruned.jobs.update({row["status"]: row["n"] for row in rows})
        if sum(row["n"] for row in rows) < batch:
            break
    while True:
        removed = await conn.fetchval(sql("prune_deliveries"), before, batch)
        pruned.deliveries += removed
        if removed < batch:
            break
    return pruned


async def prunable(conn: asyncpg.Connection, before: datetime) -> Pruned:
    """What ``prune`` would remove now (a dry run)."""
    counts = {row["kind"]: row["n"] for row in await conn.fetch(sql("prunable"), before)}
    deliveries = counts.pop(DELIVERIES, 0)
    return Pruned(jobs=Counter(counts), deliveries=deliveries)
