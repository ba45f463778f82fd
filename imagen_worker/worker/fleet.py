"""What the claim loop must know beyond its own jobs: which backends nobody serves, and which
of its own backends are unavailable right now (the backend itself, or this host's disk).

Both end up in words on the waiting jobs' rows (``jobs.progress``), so the web UI and
``imagen status`` can say why a job is still pending:

    {"state": "waiting", "reason": "no_worker", "backend": "slow",
     "message": "no worker serves backend 'slow' yet"}
    {"state": "waiting", "reason": "backend_unavailable", "backend": "gpu",
     "message": "<the adapter's unavailable_reason, why the output disk takes no files, or
                  that Storage takes no images while every slot holds one for it>"}

The claim clears the row's progress; a backend that becomes available again clears its own
reason at once. Writes are bounded per call and skip rows that already say the same. The
worker's registry entry (``imagen workers``) gets the operator's version of each reason, the
moment it changes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import structlog

from imagen_worker.backends.base import Backend
from imagen_worker.config import WorkerConfig
from imagen_worker.errors import public_message
from imagen_worker.queue.jobs import Queue
from imagen_worker.worker.disk import OutputDisk
from imagen_worker.worker.running import Emit, Event

log = structlog.get_logger("imagen.worker")

NO_WORKER = "no_worker"
UNAVAILABLE = "backend_unavailable"
# What pending rows say while every slot this worker has for their backend holds a rendered
# image that Storage does not take (down, or full): another claim would only add one more.
STORAGE_HELD = "storage cannot take images right now; the job starts once it can"


def waiting(reason: str, backend: str, message: str) -> dict[str, str]:
    """The row's waiting reason; its owner reads it, so the message is the public sentence."""
    return {"state": "waiting", "reason": reason, "backend": backend, "message": public_message(message)}


class Fleet:
    def __init__(
        self,
        queue: Queue,
        backends: Mapping[str, Backend],
        default_backend: str,
        settings: WorkerConfig,
        emit: Emit,
        disk: OutputDisk,
        storage_held: Callable[[str], int] = lambda backend: 0,
    ) -> None:
        self.queue = queue
        self.disk = disk
        # How many jobs hold every slot of a backend while they wait for Storage (0: none do).
        self.storage_held = storage_held
        self.backends = backends
        self.default_backend = default_backend
        self.settings = settings
        self.emit = emit
        self.orphans: list[str] = []
        self.outages: dict[str, str] = {}  # backend -> the reason its rows show
        self._refreshed = float("-inf")

    async def refresh(self) -> None:
        """At most once per poll interval: find unserved backends and say so on their rows.

        A backend is orphaned (its jobs that waited ``orphan_after`` fail) only when no worker
        has served it for ``orphan_after``; a shorter gap, like a restart, only makes it wait.
        """
        now = time.monotonic()
        if now - self._refreshed < self.settings.poll_interval:
            return
        self._refreshed = now
        unserved = await self.queue.unserved_backends()
        self.orphans = [u.backend for u in unserved if u.orphaned(self.settings.orphan_after)]
        for u in unserved:
            note = waiting(NO_WORKER, u.backend, f"no worker serves backend {u.backend!r} yet")
            await self.queue.mark_waiting(u.backend, note)
        for name, reason in self.outages.items():
            await self._mark(name, reason)

    def unavailable_reason(self, name: str) -> str | None:
        """Why this worker takes no work for ``name`` now, or None: a disk that takes no files
        (``disk.reason``, kept current by the worker's disk loop) holds every backend, and
        Storage holds a backend whose every slot waits for it."""
        if self.disk.reason:
            return self.disk.reason
        if self.storage_held(name):
            return STORAGE_HELD
        return self.backends[name].unavailable_reason

    def unavailable(self) -> dict[str, str]:
        """The backends this worker takes no work for, each with the operator's reason (the
        registry's, which ``imagen workers`` shows; rows get the public sentence)."""
        disk = self.disk.problem if self.disk.reason else None

        def storage(name: str) -> str | None:
            held = self.storage_held(name)
            return f"its {held} slot(s) hold rendered images that Storage does not take yet" if held else None

        return {
            name: disk or storage(name) or self.backends[name].unavailable_detail or reason
            for name, reason in self.outages.items()
        }

    async def available(self, name: str) -> bool:
        """Whether to claim for ``name`` now; records outages and their end on the rows."""
        reason = self.unavailable_reason(name)
        previous = self.outages.get(name)
        if reason is None:
            if previous is not None:
                del self.outages[name]
                self.emit(Event.BACKEND_AVAILABLE, backend=name)
                log.info("backend takes work again; claiming", backend=name)
                await self.queue.clear_waiting(name, UNAVAILABLE, with_default=name == self.default_backend)
                await self.queue.set_unavailable(self.unavailable())
            return True
        if reason != previous:
            self.outages[name] = reason
            if previous is None:
                self.emit(Event.BACKEND_UNAVAILABLE, backend=name, reason=reason)
                log.warning("backend takes no work; its jobs wait in the queue", backend=name, reason=reason)
            await self._mark(name, reason)
            await self.queue.set_unavailable(self.unavailable())
        return False

    async def _mark(self, name: str, reason: str) -> None:
        note = waiting(UNAVAILABLE, name, reason)
        await self.queue.mark_waiting(name, note, with_default=name == self.default_backend)
