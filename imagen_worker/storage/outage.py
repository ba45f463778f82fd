"""Waiting out a Storage outage with a rendered image in hand.

The render is the expensive part of a job, and once its image is on local disk nothing about
the job is wrong: an upload that fails because Storage is down must neither spend the job's
attempts nor, once they are spent, fail it (a failed job's files are removed). So the worker
keeps such a job, asks Storage again and again while it does not answer, and uploads as soon
as it does. The job stays ``running`` under its lease, and its progress tells its owner why.

An upload that fails while Storage answers other requests is the upload's own problem (an
object a proxy keeps refusing with 502): it raises as before, and the job's retries apply.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from imagen_worker.backends.base import JobContext
from imagen_worker.errors import StorageUnavailable
from imagen_worker.storage.base import StorageSink, StoredObject

log = structlog.get_logger("imagen.storage")

WAITING_MESSAGE = (
    "the image is ready and waits for storage, which is not answering; it is uploaded once storage is back"
)
UPLOADED_MESSAGE = "storage is back and the image is uploaded"


@dataclass(frozen=True)
class Patience:
    """How a job waits for Storage; ``None`` of it where the caller cannot wait (the CLI)."""

    ctx: JobContext
    # Called when the job starts waiting (a shutdown may stop it now: the image and its
    # journal stay on disk for the next attempt) and when the upload goes ahead again.
    waiting: Callable[[], None]
    resumed: Callable[[], None]
    first_pause: float = 2.0  # seconds between looks at Storage, doubling up to last_pause
    last_pause: float = 10.0


async def put(
    sink: StorageSink, key: str, source: Path, mime_type: str, patience: Patience | None
) -> StoredObject:
    """``sink.put``, waiting as long as Storage does not answer when ``patience`` is given."""
    waited = False
    pause = 0.0  # above 0 while Storage does not answer
    while True:
        try:
            stored = await sink.put(key, source, mime_type)
            break
        except StorageUnavailable:
            if patience is None:
                raise
            reason = await sink.unreachable()
            if reason is None:
                if not pause:
                    raise  # Storage answers: this upload failed on its own
                pause = 0.0  # back since the failed upload: upload again at once
                continue
            if not waited:
                waited = True
                log.warning("storage is not answering; the job's image waits on local disk", reason=reason)
                patience.waiting()
                patience.ctx.report_progress(1, 1, stage="waiting_for_storage", message=WAITING_MESSAGE)
            pause = min(2 * pause, patience.last_pause) if pause else patience.first_pause
            await asyncio.sleep(pause)
    if waited and patience is not None:
        log.info("storage answers again; the image was uploaded", key=key)
        patience.ctx.report_progress(1, 1, stage="uploaded", message=UPLOADED_MESSAGE)
        patience.resumed()
    return stored
