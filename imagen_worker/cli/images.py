"""``--image NAME=FILE``: put a local file in the owner's Storage folder and name it in params.

The file goes to ``<owner>/uploads/<name>-<sha256 prefix>.<ext>`` through the storage sink the
worker reads from (Supabase Storage, or the local sink's directory): the content hash in the
key means a queued job always gets the bytes it was submitted with, even when another upload
of the same file name follows. The bytes are checked here first (PNG, JPEG or WebP, at most
20 MB), so a wrong file fails at the prompt instead of in the worker.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from uuid import UUID

from imagen_worker.cli.failures import InputError
from imagen_worker.config import Config
from imagen_worker.errors import TerminalError
from imagen_worker.inputs import IMAGE_NAME, MAX_INPUT_BYTES, sniff
from imagen_worker.output import slugify
from imagen_worker.storage import create_sink


def parse(items: list[str]) -> dict[str, Path]:
    """``NAME=FILE`` pairs, names as workflows bind them (``init``, ``mask``)."""
    images: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not path or not IMAGE_NAME.fullmatch(name):
            raise InputError(
                f"--image {item!r}: expected NAME=FILE, NAME in lowercase letters, digits and _ "
                "(for example init=./cat.png)"
            )
        if name in images:
            raise InputError(f"--image {name} is given twice")
        images[name] = Path(path).expanduser()
    return images


def _read(name: str, path: Path) -> tuple[bytes, str]:
    try:
        if path.stat().st_size > MAX_INPUT_BYTES:
            raise InputError(f"--image {name}: {path} is larger than {MAX_INPUT_BYTES // 2**20} MB")
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"--image {name}: cannot read {path}: {exc.strerror or exc}") from None
    try:
        checked = sniff(name, str(path), data, max_pixels=2**40, backend="", label=f"--image {name}: {path}")
    except TerminalError as exc:
        raise InputError(exc.message) from None
    return data, checked.mime_type


async def upload(
    config: Config, owner: UUID, images: dict[str, Path], *, no_cloud: bool = False
) -> dict[str, str]:
    """Store each file in the owner's uploads folder; returns ``params.images`` (name -> key)."""
    if not images:
        return {}
    sink = create_sink(config, no_cloud=no_cloud)
    keys: dict[str, str] = {}
    try:
        for name, path in images.items():
            data, mime = await asyncio.to_thread(_read, name, path)
            extension = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}[mime]
            digest = hashlib.sha256(data).hexdigest()[:12]
            key = f"{owner}/uploads/{slugify(path.stem, 60)}-{digest}.{extension}"
            await sink.put_exact(key, path, mime)
            keys[name] = key
    finally:
        await sink.aclose()
    return keys
