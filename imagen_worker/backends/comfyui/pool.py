"""Which ComfyUI instance takes a prompt, and how a job remembers where its prompt went.

Each instance holds at most ``1 + lookahead`` of our prompts, so the GPU always has the next
prompt queued while the worker downloads and uploads the previous result, but the backlog stays
in PostgreSQL, where it survives restarts and can be cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid

from imagen_worker.backends.comfyui.client import ComfyUIClient


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
    """One ComfyUI process and how many of our prompts it holds right now."""

    def __init__(self, client: ComfyUIClient) -> None:
        self.client = client
        self.active = 0
        self.served = 0


class Pool:
    """Hands out instances, least busy first, never more than ``limit`` of our prompts each."""

    def __init__(self, instances: list[Instance], limit: int) -> None:
        self.instances = instances
        self.limit = limit
        self._changed = asyncio.Event()

    async def acquire(self) -> Instance:
        """Wait for a slot. While any instance is connected, unconnected ones are not used."""
        while True:
            free = [inst for inst in self.instances if inst.active < self.limit]
            if any(inst.client.connected for inst in self.instances):
                free = [inst for inst in free if inst.client.connected]
            if free:
                best = min(free, key=lambda inst: (inst.active, inst.served))
                self.occupy(best)
                return best
            changed = self._changed
            # A release wakes us; the timeout notices an instance that (re)connected.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await changed.wait()

    def occupy(self, instance: Instance) -> None:
        """Count a prompt against ``instance`` (recovery: it is already there, limit or not)."""
        instance.active += 1
        instance.served += 1

    def release(self, instance: Instance) -> None:
        instance.active -= 1
        self._changed.set()
        self._changed = asyncio.Event()
