"""The storage sink contract: where a finished image goes after it is written locally.

The pipeline always writes the image to the local output directory first; a sink then
copies that file somewhere durable. ``put`` must be an idempotent upsert on ``key`` so a
retried job overwrites its own object instead of creating a second one.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self

from imagen_worker.errors import TerminalError


@dataclass(frozen=True)
class StoredObject:
    key: str
    location: str
    # True when nothing was copied: the sink keeps the caller's own file (local storage in the
    # output directory), so the key names no object anywhere else.
    in_place: bool = False


class ObjectNotFound(TerminalError):
    """``get`` found no object under the key."""


class ObjectTooLarge(TerminalError):
    """``get`` stopped reading: the object is over the caller's size cap."""


class StorageSink(abc.ABC):
    type_name: ClassVar[str]

    @classmethod
    @abc.abstractmethod
    def from_config(cls, block: Mapping[str, Any], *, output_directory: Path) -> Self:
        """Validate the sink's own block; raise ``ConfigError('storage: reason')``."""

    @property
    def is_cloud(self) -> bool:
        return False

    @abc.abstractmethod
    async def put(self, key: str, source: Path, mime_type: str) -> StoredObject:
        """Upload ``source`` under ``key`` (streamed, upsert); raise ``RetryableError`` on blips."""

    @abc.abstractmethod
    async def sign(self, key: str, ttl_seconds: int) -> str:
        """A URL that lets someone without credentials read ``key`` for ``ttl_seconds``."""

    async def delete(self, key: str) -> None:
        """Remove ``key``; a key that is not there is no error. Used for transient objects
        (live previews), never for a job's image."""
        raise NotImplementedError(f"storage type {self.type_name} cannot delete objects")

    async def get(self, key: str, max_bytes: int) -> bytes:
        """The object's bytes (input images), streamed and refused past ``max_bytes``.

        Raises ``ObjectNotFound``, ``ObjectTooLarge``, or ``RetryableError`` on blips.
        """
        raise TerminalError(f"storage type {self.type_name!r} cannot read input images")

    async def put_exact(self, key: str, source: Path, mime_type: str) -> StoredObject:
        """Store ``source`` under exactly ``key`` (an input image a job will ``get``).

        Unlike ``put``, never kept in place: the object must be readable under its key.
        """
        return await self.put(key, source, mime_type)

    async def check(self) -> None:
        """Raise ``ConfigError`` when credentials or the bucket do not work."""

    async def aclose(self) -> None:
        """Release connections."""
