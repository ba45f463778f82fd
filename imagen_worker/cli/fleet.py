"""``imagen workers``: the fleet as the registry (``imagen.workers``) sees it, one line each.

An operator with several GPU hosts asks three things first: which workers are up, what each is
doing, and why a backend's jobs are not moving. A worker is *live* while its registration is
fresh; *draining* once a stop signal came (it finishes its jobs and claims nothing); *silent*
when it has missed two heartbeats (killed, or cut off from the database) but its entry has not
expired yet; *stopped* after a clean exit; *lost* when its entry expired without one. The jobs
a silent or lost worker still holds go back to the queue when their leases expire. Under a
worker, one line per backend it takes no work for, with the worker's own reason, and one for
its jobs that are rendered and wait for Storage to take their images (Storage down or full).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

HEADER = ("worker", "host", "pid", "version", "state", "jobs", "backends")
# A worker refreshes its registration six times per lifetime (every lease_seconds / 3, for
# 2 x lease_seconds): two missed refreshes say it is likely gone before the entry expires.
SILENT_AFTER = 2 / 6


def describe_seconds(seconds: float) -> str:
    """A short, human duration: ``45s``, ``12m``, ``3h 05m``, ``2d 04h``."""
    whole = max(0, int(seconds))
    if whole < 60:
        return f"{whole}s"
    minutes, _ = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours:02d}h"


def silent(row: Mapping[str, Any]) -> bool:
    return bool(row["live"]) and row["heartbeat_seconds"] > row["ttl_seconds"] * SILENT_AFTER


def answering(row: Mapping[str, Any]) -> bool:
    """Live and heartbeating: what the fleet can count on now (draining ones included)."""
    return bool(row["live"]) and not silent(row)


def state(row: Mapping[str, Any]) -> str:
    if row["live"]:
        if silent(row):
            return f"silent {describe_seconds(row['heartbeat_seconds'])}"
        if row["draining"]:
            return "draining"
        return f"live {describe_seconds(row['up_seconds'])}"
    if row["stopped"]:
        return f"stopped {describe_seconds(row['gone_seconds'])} ago"
    return f"lost {describe_seconds(row['heartbeat_seconds'])} ago"


def backends(row: Mapping[str, Any]) -> str:
    """The backends it serves, its default first and marked."""
    default = row["default_backend"]
    names = sorted(row["backends"], key=lambda name: (name != default, name))
    return " ".join(f"{name}*" if name == default else name for name in names)


def lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Aligned columns (full worker ids: ``job_runs.worker_id`` and the logs carry them), and
    indented lines under a worker: each backend it takes no work for, and its jobs that wait
    for Storage."""
    cells = [
        (str(row["id"]), row["hostname"], str(row["pid"]), row["version"] or "?", state(row),
         str(row["running"]), backends(row))
        for row in rows
    ]  # fmt: skip
    widths = [max(len(line[i]) for line in [HEADER, *cells]) for i in range(len(HEADER) - 1)]

    def aligned(line: Sequence[str]) -> str:
        return "  ".join([*(cell.ljust(width) for cell, width in zip(line, widths, strict=False)), line[-1]])

    out = [aligned(HEADER)]
    for row, line in zip(rows, cells, strict=True):
        out.append(aligned(line))
        under = f"{'':{widths[0]}}  "
        if row["live"]:
            out.extend(
                f"{under}{name} takes no work: {reason}"
                for name, reason in sorted(row["unavailable"].items())
            )
        if row["storage_waits"]:
            jobs = _count(row["storage_waits"], "job")
            out.append(f"{under}{jobs} rendered, waiting for Storage to take the images")
    return out


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def summary(rows: Sequence[Mapping[str, Any]]) -> str:
    """Silent workers are not counted live: killed or cut off, they may never answer again."""
    live = [row for row in rows if answering(row)]
    text = f"{_count(len(live), 'live worker')}, {_count(sum(row['running'] for row in live), 'running job')}"
    if held := sum(1 for row in live if row["unavailable"]):
        text += f"; {held} with a backend that takes no work"
    if waits := sum(row["storage_waits"] for row in rows):
        text += f"; {waits} waiting for Storage"
    gone = {
        "silent": [row for row in rows if silent(row)],
        "lost": [row for row in rows if not row["live"] and not row["stopped"]],
    }
    for label, group in gone.items():
        if not group:
            continue
        text += f"; {len(group)} {label}"
        if jobs := sum(row["running"] for row in group):
            text += f", still holding {_count(jobs, 'job')}: another worker takes over once the lease expires"
    return text
