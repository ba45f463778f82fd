"""The local sink: the image stays on this machine.

With no ``directory`` (or the output directory itself) the pipeline's local file already is
the stored copy, so ``put`` does nothing. With another directory (a NAS mount, a synced
folder) the file is copied there under its storage key, atomically, so a retried job
overwrites its own copy and a reader never sees half a file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

import anyio

from imagen_worker.errors import ConfigError, RetryableError, TerminalError
from imagen_worker.storage.base import ObjectNotFound, ObjectTooLarge, StorageSink, StoredObject
from imagen_worker.storage.keys import InvalidStorageKey, check_key

_KEYS = frozenset({"type", "directory"})


class LocalSink(StorageSink):
    type_name = "local"

    def __init__(self, directory: Path, *, output_directory: Path) -> None:
        self.directory = directory.expanduser()
        self.output_directory = output_directory.expanduser()
        # Decided once: resolving both paths on every put cost two realpath walks per image.
        self.in_place = _same_path(self.directory, self.output_directory)

    @classmethod
    def from_config(cls, block: Mapping[str, Any], *, output_directory: Path) -> Self:
        unknown = set(block) - _KEYS
        if unknown:
            raise ConfigError(
                f"storage: unknown key(s) {sorted(unknown)} for type local; use {sorted(_KEYS)}"
            )
        raw = block.get("directory")
        if raw is not None and (not isinstance(raw, str | os.PathLike) or not str(raw)):
            raise ConfigError("storage.directory: must be a directory path")
        directory = Path(raw) if raw is not None else output_directory
        return cls(directory, output_directory=output_directory)

    def _target(self, key: str) -> Path:
        check_key(key)
        target = self.directory / key
        root = self.directory.resolve()
        if not target.resolve().is_relative_to(root):
            raise InvalidStorageKey(key, f"resolves outside {self.directory}")
        return target

    async def put(self, key: str, source: Path, mime_type: str) -> StoredObject:
        if self.in_place:
            # The output file is the stored copy: one stat, no thread, no path resolution.
            check_key(key)
            return StoredObject(key=key, location=_existing_uri(key, source), in_place=True)
        target = self._target(key)
        return await asyncio.to_thread(self._put_sync, key, source, target)

    def _put_sync(self, key: str, source: Path, target: Path) -> StoredObject:
        _must_exist(key, source)
        if _same_path(source, target):
            return StoredObject(key=key, location=source.resolve().as_uri(), in_place=True)
        try:
            _atomic_copy(source, target)
        except OSError as exc:
            raise RetryableError(
                f"could not copy the image to {target}: {exc.strerror or exc}",
                detail={"operation": "upload", "sink": "local", "key": key, "target": str(target)},
            ) from exc
        return StoredObject(key=key, location=target.resolve().as_uri())

    async def delete(self, key: str) -> None:
        target = self._target(key)

        def remove() -> None:
            target.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # the key's folder, when it held only this file
                target.parent.rmdir()

        await asyncio.to_thread(remove)

    async def get(self, key: str, max_bytes: int) -> bytes:
        target = self._target(key)
        return await asyncio.to_thread(_read_capped, key, target, max_bytes)

    async def put_exact(self, key: str, source: Path, mime_type: str) -> StoredObject:
        target = self._target(key)
        try:
            await asyncio.to_thread(_atomic_copy, source, target)
        except OSError as exc:
            raise TerminalError(
                f"could not copy {source} to {target}: {exc.strerror or exc}",
                detail={"operation": "upload", "sink": "local", "key": key, "target": str(target)},
            ) from None
        return StoredObject(key=key, location=target.resolve().as_uri())

    async def sign(self, key: str, ttl_seconds: int) -> str:
        """A ``file://`` URI: local files need no signature, ``ttl_seconds`` is only validated."""
        if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int) or ttl_seconds < 1:
            raise ValueError("ttl_seconds must be a whole number of seconds, at least 1")
        target = self._target(key)
        if not await anyio.Path(target).is_file():
            raise TerminalError(
                f"no local file for storage key {key!r} under {self.directory}",
                detail={"operation": "sign", "sink": "local", "key": key},
            )
        return (await anyio.Path(target).resolve()).as_uri()

    async def check(self) -> None:
        if self.in_place:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"storage.directory {self.directory}: {exc.strerror or exc}") from None
        if not os.access(self.directory, os.W_OK):
            raise ConfigError(f"storage.directory {self.directory}: not writable")


def _must_exist(key: str, source: Path) -> None:
    if not source.is_file():
        raise TerminalError(
            f"the local image {source} is missing, nothing to store",
            detail={"operation": "upload", "sink": "local", "key": key, "source": str(source)},
        )


def _existing_uri(key: str, source: Path) -> str:
    _must_exist(key, source)
    return source.absolute().as_uri()


def _same_path(a: Path, b: Path) -> bool:
    return a.expanduser().resolve() == b.expanduser().resolve()


def _read_capped(key: str, target: Path, max_bytes: int) -> bytes:
    detail = {"operation": "download", "sink": "local", "key": key}
    try:
        with open(target, "rb") as handle:
            data = handle.read(max_bytes + 1)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise ObjectNotFound(f"no object {key!r} in {target.parent}", detail=detail) from None
    except OSError as exc:
        raise RetryableError(f"could not read {target}: {exc.strerror or exc}", detail=detail) from None
    if len(data) > max_bytes:
        raise ObjectTooLarge(f"object {key!r} is over {max_bytes} bytes", detail=detail)
    return data


def _atomic_copy(source: Path, target: Path) -> None:
    """Copy next to the target, fsync, then rename over it: readers see old or new, never half."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(source, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1024 * 1024)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
