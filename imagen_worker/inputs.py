"""Input images: a job names them by Storage key in its owner's own folder, never by URL.

``params.images`` maps the names a workflow binds (``init``, ``mask``) to keys such as
``<owner id>/uploads/cat.png``. A key outside the owner's folder is refused by the params model
(``OwnedKey``), so no job can read another user's objects or anything internal. Before the
backend runs, the pipeline fetches each image from the storage sink and checks the bytes
themselves: at most ``MAX_INPUT_BYTES``, a PNG, JPEG or WebP by its header (never by its name),
within the backend's ``max_pixels``, and decodable to the end. Every refusal is one sentence.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import re
from collections.abc import Mapping
from typing import Annotated, Any
from uuid import UUID

from PIL import Image, UnidentifiedImageError
from pydantic import AfterValidator, Field, ValidationInfo

from imagen_worker.backends.base import GenerateRequest, InputImage
from imagen_worker.errors import TerminalError
from imagen_worker.storage import outage
from imagen_worker.storage.base import ObjectNotFound, ObjectTooLarge, StorageSink
from imagen_worker.storage.keys import InvalidStorageKey, check_key

# The params key whose values are input images; adapters that take none refuse it.
IMAGES_PARAM = "images"
MAX_INPUT_BYTES = 20 * 2**20
MAX_INPUTS = 8
# An input image's name (``init``, ``mask``): ComfyUI gets the file under this name.
IMAGE_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
# MPO is what some cameras write: a JPEG with extra views, of which ComfyUI loads the first.
_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "MPO": "image/jpeg", "WEBP": "image/webp"}


def key_problem(key: str, owner: UUID | None) -> str | None:
    """Why ``key`` may not be read for a job of ``owner``, or None when it may."""
    if owner is None:
        return "a job without an owner can name no input image"
    if "://" in key:
        return "input images are Storage keys in the owner's own folder, never URLs"
    try:
        check_key(key)
    except InvalidStorageKey as exc:
        return f"not a usable Storage key ({exc.reason})"
    if not key.startswith(f"{owner}/"):
        return "not in the job owner's own Storage folder (keys start with the owner's user id and '/')"
    return None


def _owned(key: str, info: ValidationInfo) -> str:
    owner = (info.context or {}).get("owner")
    problem = key_problem(key, owner if isinstance(owner, UUID) else None)
    if problem is not None:
        raise ValueError(problem)  # a value error: the message says it all, without the key again
    return key


# One input image's key, as a params model types it (the owner comes from the validation context).
OwnedKey = Annotated[str, Field(min_length=1, max_length=900), AfterValidator(_owned)]


async def attach(
    request: GenerateRequest,
    sink: StorageSink,
    *,
    max_pixels: int,
    backend: str,
    patience: outage.Patience | None = None,
) -> GenerateRequest:
    """The request with ``inputs`` filled from storage; ``TerminalError`` names the bad image.

    With ``patience`` a Storage outage makes the job wait for it (``storage.outage``)."""
    wanted = request.params.get(IMAGES_PARAM)
    if not isinstance(wanted, Mapping) or not wanted:
        return request
    if len(wanted) > MAX_INPUTS:
        raise TerminalError(f"the job names {len(wanted)} input images; at most {MAX_INPUTS} are allowed")
    inputs: dict[str, InputImage] = {}
    for name, key in wanted.items():
        problem = key_problem(str(key), request.owner_user_id)
        if problem is not None:  # the params model refused it already; never read it regardless
            raise TerminalError(f"input image {name}: {problem}", detail={"input": name})
        try:
            data = await outage.get(sink, key, MAX_INPUT_BYTES, patience)
        except ObjectNotFound:
            raise TerminalError(
                f"input image {name} ({key}) was not found in storage; upload it first",
                detail={"input": name, "key": key},
            ) from None
        except ObjectTooLarge:
            raise TerminalError(
                f"input image {name} ({key}) is larger than the {MAX_INPUT_BYTES // 2**20} MB allowed "
                "for an input image",
                detail={"input": name, "key": key, "max_bytes": MAX_INPUT_BYTES},
            ) from None
        inputs[name] = await asyncio.to_thread(sniff, name, key, data, max_pixels, backend)
    return dataclasses.replace(request, inputs=inputs)


def sniff(
    name: str, key: str, data: bytes, max_pixels: int, backend: str, *, label: str | None = None
) -> InputImage:
    """Check the bytes: a whole, still PNG, JPEG or WebP within ``max_pixels``; else one sentence.

    ``label`` is how the sentence names the image (default: ``input image NAME (KEY)``).
    """
    detail: dict[str, Any] = {"input": name, "key": key}
    label = label or f"input image {name} ({key})"
    try:
        with Image.open(io.BytesIO(data)) as image:
            mime = _FORMATS.get(image.format or "")
            width, height = image.size
            if mime is None:
                raise _NotAnImage
            if image.format != "MPO" and getattr(image, "n_frames", 1) > 1:
                # ComfyUI's LoadImage turns every frame into a batch item: one upload, many images.
                raise TerminalError(
                    f"{label} is animated; input images must be still images",
                    detail=detail,
                )
            if width * height > max_pixels:
                raise TerminalError(
                    f'{label} is {width}x{height}, over backend "{backend}"\'s limit '
                    f"of {max_pixels} pixels (max_pixels)",
                    detail={**detail, "max_pixels": max_pixels},
                )
            image.load()  # a truncated or corrupt file fails here, not inside the backend
    except Image.DecompressionBombError:
        raise TerminalError(f"{label} has more pixels than any backend accepts", detail=detail) from None
    except (_NotAnImage, UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise TerminalError(f"{label} is not a PNG, JPEG or WebP image", detail=detail) from None
    return InputImage(key=key, data=data, mime_type=mime, width=width, height=height)


class _NotAnImage(Exception):
    pass
