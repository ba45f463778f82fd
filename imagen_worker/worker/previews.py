"""A running job's live preview in Storage: the latest frame, at most one upload a second.

Backends offer frames as fast as ComfyUI sends them (a sampler sends one per step); only the
newest one is kept and uploaded once the last upload is a second old, to
``<owner>/<job id>/preview.jpg`` (``.png`` for PNG frames), through the job's own storage sink.
The frame is written under the output directory first because sinks upload files. When the
job ends its last progress stops naming the preview, its outcome is recorded, and then the
preview is deleted, unless ``output.keep_previews`` is set. A job that ran before deletes
whatever preview an earlier attempt left too (a worker killed mid-render never deleted its
own). Previews are best effort: a failed upload or delete is logged and the job goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from uuid import UUID

import structlog

from imagen_worker import output
from imagen_worker.errors import said
from imagen_worker.storage.base import StorageSink
from imagen_worker.storage.keys import PREVIEW_EXTENSIONS, preview_key

log = structlog.get_logger("imagen.job")

DELETE_WITHIN = 5.0  # seconds for removing a finished job's preview from Storage


class Previews:
    def __init__(
        self,
        sink: StorageSink,
        directory: Path,
        owner: UUID | None,
        job_id: UUID,
        *,
        keep: bool = False,
        ran_before: bool = False,
        min_interval: float = 1.0,
        on_stored: Callable[[str], None] = lambda key: None,
    ) -> None:
        self.sink = sink
        self.directory = directory
        self.owner = owner
        self.job_id = job_id
        self.keep = keep
        self.min_interval = min_interval
        self.on_stored = on_stored  # told the key after each upload (it goes into jobs.progress)
        # What discard() deletes: this attempt's uploads, and an earlier attempt's any format.
        earlier = PREVIEW_EXTENSIONS if ran_before else {}
        self.stored: set[str] = {preview_key(owner, job_id, mime_type) for mime_type in earlier}
        self.uploads = 0
        self._latest: tuple[bytes, str] | None = None
        self._last_upload = -float("inf")
        self._task: asyncio.Task[None] | None = None

    def offer(self, data: bytes, mime_type: str) -> None:
        if mime_type not in PREVIEW_EXTENSIONS:
            return
        self._latest = (data, mime_type)
        if self._task is None or self._task.done():
            delay = max(0.0, self._last_upload + self.min_interval - time.monotonic())
            self._task = asyncio.create_task(self._upload_after(delay))

    async def _upload_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        frame, self._latest = self._latest, None
        if frame is None:
            return
        self._last_upload = time.monotonic()
        key = preview_key(self.owner, self.job_id, frame[1])
        self.stored.add(key)  # before the upload: a cut-short upload is deleted too
        try:
            await self._put(key, *frame)
        except Exception as exc:  # a preview is best effort; the job goes on
            log.warning("preview upload failed", key=key, error=said(exc))
            return
        self.uploads += 1
        self.on_stored(key)

    async def _put(self, key: str, data: bytes, mime_type: str) -> None:
        path = self.directory / key
        await asyncio.to_thread(output.write_copy, path, data)  # a passing frame: no fsync
        stored = await self.sink.put(key, path, mime_type)
        if not stored.in_place:  # else the sink keeps this very file
            await asyncio.to_thread(_remove, path)

    async def stop(self) -> None:
        """No more uploads: the job has ended."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._latest = None

    async def discard(self) -> None:
        """Delete what was uploaded, unless previews are kept. Called once the job's outcome is
        recorded, so a slow Storage delays nobody's ``done``; the deletes are bounded together."""
        if self.keep:
            return
        # Bounded: a Storage outage must not hold up the end of the job's task (a drain waits on it).
        deadline = asyncio.get_running_loop().time() + DELETE_WITHIN
        for key in sorted(self.stored):
            await asyncio.to_thread(_remove, self.directory / key)
            try:
                async with asyncio.timeout_at(deadline):
                    await self.sink.delete(key)
            except Exception as exc:
                log.warning("preview delete failed", key=key, error=said(exc))
        self.stored.clear()


def _remove(path: Path) -> None:
    """The local frame, and its job and owner folders when they held nothing else."""
    path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        path.parent.rmdir()
        path.parent.parent.rmdir()
