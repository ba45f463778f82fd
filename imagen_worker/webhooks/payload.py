"""The JSON a receiver gets: the job as it ended and its images, nothing internal.

No worker ids, leases, backend references, params or local paths: the body is what the job's
owner may see in the web app anyway, so a receiver can forward it without filtering.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import asyncpg

from imagen_worker.config import WebhookEvent


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def body(delivery: asyncpg.Record, job: asyncpg.Record | None) -> bytes:
    """The JSON the receiver gets: the job as it ended, its images, no worker internals."""
    payload: dict[str, Any] = {
        "id": str(delivery["id"]),
        "event": delivery["event"],
        "created_at": _iso(delivery["created_at"]),
        "job": None,
    }
    if job is not None:
        payload["job"] = {
            "id": str(job["id"]),
            "owner_user_id": str(job["owner_user_id"]),
            "status": delivery["event"],
            "error": job["error"] if delivery["event"] != WebhookEvent.DONE else None,
            "created_at": _iso(job["created_at"]),
            "started_at": _iso(job["started_at"]),
            "finished_at": _iso(job["finished_at"]),
            "image_id": str(job["image_id"]) if job["image_id"] else None,
            "images": job["images"],
        }
    return json.dumps(payload, separators=(",", ":")).encode()
