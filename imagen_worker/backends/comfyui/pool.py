"""Which ComfyUI instance takes a prompt, and how a job finds its prompt again.

Each instance holds at most ``1 + lookahead`` of our prompts, so the GPU always has the next
prompt queued while the worker downloads and uploads the previous result, but the backlog stays
in PostgreSQL, where it survives restarts and can be cancelled.

Only *usable* instances take prompts: not down (see ``client.Link``; one still connecting
counts), not held (its last prompt could not save its file: disk full) and ComfyUI's queue
holds nothing but ours; connected ones first. An instance busy with other people's prompts
(someone using the ComfyUI UI, another worker) takes no more of ours until it frees up; a
tracker per instance re-reads ``/queue`` whenever ComfyUI broadcasts a queue change, to know.
A broadcast saying the queue is empty needs no read: the instance is free at once, so a job
claimed right after someone else's prompt ended does not wait for it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
import uuid
from collections.abc import Callable

import structlog

from imagen_worker.backends.comfyui import failures
from imagen_worker.backends.comfyui.client import ComfyUIClient, Link
from imagen_worker.errors import JobError

log = structlog.get_logger(__name__)

# Our prompts that just left an instance: a /queue answer read before they left must not
# make them look foreign.
RETIRED_KEPT = 64
# An instance whose disk is full takes no prompts for this long, doubling while it stays full.
HOLD_FIRST = 30.0
HOLD_MAX = 300.0


# The namespace of first prompt ids (uuid5): any fixed UUID would do, it must never change.
FIRST_PROMPT_NAMESPACE = uuid.UUID("5b0f6a3e-8c1d-4e52-9a7b-2f64c9d0e1a8")


def first_prompt_id(job_id: uuid.UUID) -> str:
    """The prompt id of a job's first submission, derived from the job id alone.

    The first claim submits under it without recording a ref first (a commit saved on every
    job); a later attempt with no ref looks for it on every instance. A canonical UUID, as
    ComfyUI 0.38 and later require of a client's prompt id.
    """
    return str(uuid.uuid5(FIRST_PROMPT_NAMESPACE, str(job_id)))


def make_ref(prompt_id: str, base_url: str) -> str:
    """The job's backend ref: ``<prompt_id>@<base_url>`` (a uuid4 has no ``@``)."""
    return f"{prompt_id}@{base_url}"


def parse_ref(ref: str) -> tuple[str, str] | None:
    prompt_id, at, base_url = ref.partition("@")
    try:
        uuid.UUID(prompt_id)
    except ValueError:
        return None
    return (prompt_id, base_url) if at and base_url else None


class Instance:
    """One ComfyUI process: our prompts in it, and the foreign ones seen at the last look."""

    def __init__(self, client: ComfyUIClient) -> None:
        self.client = client
        self.prompts: set[str] = set()  # ours, from just before the POST until they left ComfyUI
        self.retired: collections.deque[str] = collections.deque(maxlen=RETIRED_KEPT)
        self.foreign: frozenset[str] = frozenset()
        self.served = 0
        self.dirty = asyncio.Event()  # ComfyUI's queue changed: read /queue again
        self.held_until = 0.0  # monotonic; see Pool.hold
        self.holds = 0  # holds in a row, without a saved result between them

    @property
    def active(self) -> int:
        return len(self.prompts)

    @property
    def held(self) -> bool:
        return time.monotonic() < self.held_until

    @property
    def usable(self) -> bool:
        return self.client.link is not Link.DOWN and not self.foreign and not self.held


class Pool:
    """Hands out usable instances, least busy first, never more than ``limit`` of our prompts each."""

    def __init__(
        self, instances: list[Instance], limit: int, recheck: float, on_change: Callable[[], None]
    ) -> None:
        self.instances = instances
        self.limit = limit
        self._recheck = recheck
        self._on_change = on_change
        self._changed = asyncio.Event()
        self._trackers: list[asyncio.Task[None]] = []
        for inst in instances:
            inst.client.on_change = self._signal_for(inst)

    @property
    def all_down(self) -> bool:
        return all(inst.client.link is Link.DOWN for inst in self.instances)

    @property
    def all_held(self) -> bool:
        """Every instance is down or held, and one at least is held: none can save an image."""
        held = [inst.held for inst in self.instances if inst.client.link is not Link.DOWN]
        return bool(held) and all(held)

    def hold(self, inst: Instance) -> float:
        """Keep prompts off an instance that could not save a file (its disk is full): every
        prompt there would fail the same way. ``HOLD_FIRST`` seconds, doubling up to
        ``HOLD_MAX`` while the prompt after each hold fails again; returns the seconds."""
        seconds: float = min(HOLD_FIRST * 2.0**inst.holds, HOLD_MAX)
        inst.holds += 1
        inst.held_until = time.monotonic() + seconds
        asyncio.get_running_loop().call_later(seconds, self._changed_now)
        self._changed_now()
        return seconds

    def saved(self, inst: Instance) -> None:
        """A prompt's files were saved: the instance's disk takes files again."""
        inst.holds = 0

    def start(self) -> None:
        if not self._trackers:
            self._trackers = [
                asyncio.create_task(self._track(inst), name=f"comfyui-queue {inst.client.base_url}")
                for inst in self.instances
            ]

    async def aclose(self) -> None:
        for task in self._trackers:
            task.cancel()
        await asyncio.gather(*self._trackers, return_exceptions=True)
        self._trackers = []

    async def acquire(self, prompt_id: str, within: float) -> Instance:
        """Wait up to ``within`` seconds for a slot on a usable instance.

        Raises ``BackendUnavailable`` at once when every instance is down, and when the wait
        runs out (all busy with other work, or still connecting).
        """
        loop = asyncio.get_running_loop()
        give_up = loop.time() + within
        while True:
            usable = [inst for inst in self.instances if inst.usable]
            if any(inst.client.connected for inst in usable):
                usable = [inst for inst in usable if inst.client.connected]
            free = [inst for inst in usable if inst.active < self.limit]
            if free:
                best = min(free, key=lambda inst: (inst.active, inst.served))
                self.occupy(best, prompt_id)
                return best
            if self.all_down:
                raise failures.unreachable(
                    ", ".join(inst.client.base_url for inst in self.instances), "no instance answers"
                )
            left = give_up - loop.time()
            if left <= 0:
                raise failures.no_free_instance(within)
            changed = self._changed
            # A release or a state change wakes us; the timeout is only a backstop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, 0.5)):
                    await changed.wait()

    def occupy(self, instance: Instance, prompt_id: str) -> None:
        """Count a prompt against ``instance`` (recovery: it is already there, limit or not)."""
        instance.prompts.add(prompt_id)
        instance.served += 1

    def release(self, instance: Instance, prompt_id: str) -> None:
        instance.prompts.discard(prompt_id)
        instance.retired.append(prompt_id)
        self._changed_now()

    # --- foreign work and reachability --------------------------------------------------

    def _signal_for(self, inst: Instance) -> Callable[[], None]:
        def signal() -> None:
            inst.dirty.set()
            if inst.client.broadcast_remaining == 0:
                self._set_foreign(inst, frozenset())
            self._changed_now()

        return signal

    async def _track(self, inst: Instance) -> None:
        """Keep ``inst.foreign`` current; while it is busy with others, also look every ``recheck``."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._recheck if inst.foreign else None):
                    await inst.dirty.wait()
            inst.dirty.clear()
            remaining = inst.client.broadcast_remaining
            if inst.client.link is not Link.UP or remaining == 0:
                foreign: frozenset[str] = frozenset()  # a restarted ComfyUI has an empty queue
            elif remaining is not None and remaining <= len(inst.prompts):
                # Each prompt there can be one of ours: the queue, which carries every prompt's
                # whole graph, is not read. A foreign prompt this hides (queued just as one of
                # ours ended) shows at the next broadcast, as the count then exceeds ours.
                foreign = frozenset()
            else:
                try:
                    queue = await inst.client.queue()
                except JobError:
                    continue  # the socket will say whether it is gone
                if inst.dirty.is_set():
                    continue  # a newer broadcast came while we read: read again
                foreign = queue.foreign(inst.prompts | set(inst.retired))
            if self._set_foreign(inst, foreign):
                self._changed_now()

    @staticmethod
    def _set_foreign(inst: Instance, foreign: frozenset[str]) -> bool:
        if foreign == inst.foreign:
            return False
        if bool(foreign) != bool(inst.foreign):
            log.info(
                "comfyui instance busy with other work; it takes none of ours"
                if foreign
                else "comfyui instance free of other work again",
                instance=inst.client.base_url,
                foreign_prompts=len(foreign),
            )
        inst.foreign = foreign
        return True

    def _changed_now(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
        self._on_change()
