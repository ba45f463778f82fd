"""Hostile input images from the web: other users' files, escapes, URLs, non-images, bombs.

Each job is INSERTed by a signed-in web user (``authenticated``, RLS) and must end ``failed``
with one readable sentence, without a byte reaching ComfyUI; the worker keeps serving.
"""

from __future__ import annotations

import io
import struct
import uuid
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from PIL import Image

from imagen_worker.inputs import MAX_INPUT_BYTES
from imagen_worker.storage.supabase import SupabaseSink
from tests.fakes.comfyui import FakeComfyUI
from tests.fakes.storage import FakeStorage
from tests.hostile.test_hostile_input import web_insert
from tests.workers import make_config, running_worker, terminal

USER = uuid.UUID("00000000-0000-4000-8000-0000000000a1")
OTHER = uuid.UUID("00000000-0000-4000-8000-0000000000b2")
FAST = {"poll_interval": 0.5, "interrupt_grace": 2.0, "connect_timeout": 2.0, "timeout": 30}


def bomb() -> bytes:
    """A PNG header claiming 30000x30000 pixels over a few bytes of data."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def animated() -> bytes:
    """A two-frame WebP: ComfyUI would load it as a batch of two."""
    out = io.BytesIO()
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(out, "WEBP", save_all=True, append_images=frames[1:])
    return out.getvalue()


def encoded(width: int, height: int, kind: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(out, kind)
    return out.getvalue()


@pytest.fixture
async def storage(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> AsyncIterator[FakeStorage]:
    async with FakeStorage() as fake:
        monkeypatch.setenv("SUPABASE_URL", fake.url)
        monkeypatch.setenv("SUPABASE_SERVICE_KEY", fake.service_key)
        sink = SupabaseSink(url=fake.url, key=fake.service_key)
        huge = tmp_path / "huge.png"
        huge.write_bytes(encoded(64, 64) + b"\0" * MAX_INPUT_BYTES)
        files: dict[str, bytes | Path] = {
            f"{OTHER}/uploads/secret.png": encoded(32, 32),
            f"{USER}/uploads/cat.png": encoded(32, 32),
            f"{USER}/uploads/notes.png": b"#!/bin/sh\necho not an image\n",
            f"{USER}/uploads/anim.gif": encoded(32, 32, "GIF"),
            f"{USER}/uploads/cut.png": encoded(64, 64)[:-40],
            f"{USER}/uploads/wide.png": encoded(4096, 1024),
            f"{USER}/uploads/bomb.png": bomb(),
            f"{USER}/uploads/moving.webp": animated(),
            f"{USER}/uploads/huge.png": huge,
        }
        for key, data in files.items():
            source = data if isinstance(data, Path) else tmp_path / uuid.uuid4().hex
            if not isinstance(data, Path):
                source.write_bytes(data)
            await sink.put_exact(key, source, "image/png")
        await sink.aclose()
        yield fake


CASES: list[tuple[str, str]] = [
    (
        f"{USER}/uploads/moving.webp",
        f"input image init ({USER}/uploads/moving.webp) is animated; input images",
    ),
    (
        f"{USER}/uploads/bomb.png",
        f"input image init ({USER}/uploads/bomb.png) has more pixels than any backend",
    ),
    (f"{OTHER}/uploads/secret.png", "params.images.init: not in the job owner's own Storage folder"),
    (
        f"{USER}/../{OTHER}/uploads/secret.png",
        "params.images.init: not a usable Storage key ('..' path segment)",
    ),
    (f"{USER}/uploads/./cat.png", "params.images.init: not a usable Storage key ('.' path segment)"),
    (
        "https://169.254.169.254/latest/meta-data",
        "params.images.init: input images are Storage keys in the owner's",
    ),
    (f"/{USER}/uploads/cat.png", "params.images.init: not a usable Storage key (empty path segment"),
    (
        f"{USER}/uploads/notes.png",
        f"input image init ({USER}/uploads/notes.png) is not a PNG, JPEG or WebP image",
    ),
    (
        f"{USER}/uploads/anim.gif",
        f"input image init ({USER}/uploads/anim.gif) is not a PNG, JPEG or WebP image",
    ),
    (
        f"{USER}/uploads/cut.png",
        f"input image init ({USER}/uploads/cut.png) is not a PNG, JPEG or WebP image",
    ),
    (
        f"{USER}/uploads/huge.png",
        f"input image init ({USER}/uploads/huge.png) is larger than the 20 MB allowed for an input image",
    ),
    (
        f"{USER}/uploads/wide.png",
        f'input image init ({USER}/uploads/wide.png) is 4096x1024, over backend "gpu"\'s limit of 1048576 '
        "pixels (max_pixels)",
    ),
]


async def test_hostile_input_images_fail_in_one_sentence_and_nothing_reaches_comfyui(
    db: asyncpg.Pool, database_url: str, tmp_path: Path, fake_comfyui: FakeComfyUI, storage: FakeStorage
) -> None:
    block = {
        "type": "comfyui",
        "urls": [fake_comfyui.url],
        "workflow": "sd15-img2img",
        "max_pixels": 1024 * 1024,
        **FAST,
    }
    config = make_config(tmp_path, backends={"gpu": block}, storage={"type": "supabase"})
    rows: list[tuple[str, asyncpg.Record]] = []
    async with running_worker(config, database_url):
        for key, expected in CASES:
            job_id = await web_insert(db, USER, _row(key))
            rows.append((expected, await terminal(db, job_id, within=15)))
        good = await web_insert(db, USER, _row(f"{USER}/uploads/cat.png"))
        after = await terminal(db, good, within=15)

    for expected, row in rows:
        assert row["status"] == "failed"
        assert expected in row["error"], row["error"]
        assert "\n" not in row["error"]
    assert after["status"] == "done", after["error"]
    uploads = fake_comfyui.calls("POST", "/upload/image")
    assert len(uploads) == 1, "only the good job's image reached ComfyUI"
    assert ("input", f"imagen/{good}", "init.png") in fake_comfyui.files


def _row(key: str) -> dict[str, Any]:
    return {
        "prompt": "make it blue",
        "width": 512,
        "height": 512,
        "params": {"images": {"init": key}},
    }
