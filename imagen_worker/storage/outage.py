"""Waiting for Storage with a rendered image in hand.

The render is the expensive part of a job, and once its image is on local disk nothing about
the job is wrong: an upload that fails because Storage is down, or answers but cannot store
(its own disk full: HTTP 500 "ENOSPC"), must neither spend the job's attempts nor, once they
are spent, fail it (a failed job's files are removed). So the worker keeps such a job, tries
again and again, and goes on as soon as Storage takes the file. The job stays ``running``
under its lease, and its progress tells its owner why. Only an upload the sink gave up on for
a transient reason waits (a transport error, 429 or 5xx, through the sink's own retries); a
refusal (a 4xx: wrong key, no such bucket, too large) fails as before.

A job's input image is read the same way: it waits before its render instead of spending its
attempts.

A Storage that accepts connections and never answers fails an upload only after the sink's
own timeouts and retries (minutes). Its job would look finished but for its status all that
time, so an upload (or input read) that has no answer after ``SLOW_AFTER`` seconds already
says, in its progress, that the job waits for Storage; nothing else changes until it fails or
lands (a stop still lets it finish, as any upload of a rendered image).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import structlog

from imagen_worker.backends.base import JobContext
from imagen_worker.errors import StorageUnavailable
from imagen_worker.storage.base import StorageSink, StoredObject

log = structlog.get_logger("imagen.storage")

T = TypeVar("T")

WAITING_MESSAGE = (
    "the image is ready and waits for storage, which cannot take it right now; it is uploaded once it can"
)
UPLOADED_MESSAGE = "storage is back and the image is uploaded"
INPUT_WAITING_MESSAGE = (
    "the job's input image is in storage, which cannot serve it right now; the job goes on once it can"
)
INPUT_READ_MESSAGE = "storage is back and the input image is read"
SLOW_AFTER = 15.0  # seconds without an answer before the job's progress says it waits


@dataclass(frozen=True)
class Patience:
    """How a job waits for Storage; ``None`` of it where the caller cannot wait (the CLI)."""

    ctx: JobContext
    # Called when the job starts waiting (a shutdown may stop it now: a rendered image and its
    # journal stay on disk for the next attempt) and when an upload goes ahead again.
    waiting: Callable[[], None]
    resumed: Callable[[], None]
    first_pause: float = 2.0  # seconds between tries, doubling up to last_pause
    last_pause: float = 10.0
    # Called when Storage answers after a wait, an upload's or an input read's: the job no
    # longer waits for it (an input read then renders; nothing to resume).
    answered: Callable[[], None] = lambda: None


async def put(
    sink: StorageSink, key: str, source: Path, mime_type: str, patience: Patience | None
) -> StoredObject:
    """``sink.put``, waiting as long as Storage cannot take the file when ``patience`` is given."""
    return await _patiently(
        lambda: sink.put(key, source, mime_type), patience, WAITING_MESSAGE, UPLOADED_MESSAGE, 1.0
    )


async def get(sink: StorageSink, key: str, max_bytes: int, patience: Patience | None) -> bytes:
    """``sink.get`` of an input image, waiting the same way. Nothing is rendered yet: the job's
    progress stays at 0 and going ahead is no upload to let finish (``resumed`` is not called)."""
    before_render = replace(patience, resumed=lambda: None) if patience is not None else None
    return await _patiently(
        lambda: sink.get(key, max_bytes), before_render, INPUT_WAITING_MESSAGE, INPUT_READ_MESSAGE, 0.0
    )


async def _patiently(
    call: Callable[[], Awaitable[T]],
    patience: Patience | None,
    waiting: str,
    back: str,
    progress: float,  # the job's progress while it waits: its percentage never goes down
) -> T:
    waited = said_slow = False

    def slow(ctx: JobContext) -> None:  # armed only before the first wait, cancelled by its end
        nonlocal said_slow
        said_slow = True
        log.warning("storage has not answered yet; the job waits for it", after_seconds=SLOW_AFTER)
        ctx.report_progress(progress, 1, stage="waiting_for_storage", message=waiting)

    pause = 0.0
    while True:
        timer = None
        if patience is not None and not (waited or said_slow):
            timer = asyncio.get_running_loop().call_later(SLOW_AFTER, slow, patience.ctx)
        try:
            answer = await call()
            break
        except StorageUnavailable as exc:
            if patience is None:
                raise
            if not waited:
                waited = True
                log.warning("storage does not take the file; the job waits for it", reason=exc.message)
                patience.waiting()
                if not said_slow:
                    patience.ctx.report_progress(progress, 1, stage="waiting_for_storage", message=waiting)
            pause = min(2 * pause, patience.last_pause) if pause else patience.first_pause
            await asyncio.sleep(pause)
        finally:
            if timer is not None:
                timer.cancel()
    if (waited or said_slow) and patience is not None:
        log.info("storage takes the file again; the job goes on")
        patience.ctx.report_progress(progress, 1, stage="storage_back", message=back)
        if waited:
            patience.answered()
            patience.resumed()
    return answer
