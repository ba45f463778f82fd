"""Storage keys: where a job's image lives, and what no sink may accept.

A job's keys are a pure function of its owner, its id and the image's index in the batch:
``<owner id>/<job id>.<ext>`` for the first image, ``<owner id>/<job id>-<index>.<ext>`` for the
others, ``<owner id>/<job id>/<index>.thumb.webp`` for each thumbnail. Every attempt on every
host writes the same objects, two owners can never collide, and the Storage read policy checks
the first folder against the caller's user id.

Keys use only ``[a-z0-9.-]`` segments, but a sink must
not trust that: httpx silently collapses ``..`` segments (the object lands somewhere else),
the Storage server refuses non-ASCII keys, and a local sink must never write outside its
directory. Refusing early turns all of that into one terminal job error with a clear reason.
"""

from __future__ import annotations

import re
from urllib.parse import quote
from uuid import UUID

from imagen_worker.errors import ConfigError, TerminalError

# Supabase Storage's own validator (src/storage/limits.ts isValidKey), one segment at a time.
_SEGMENT = re.compile(r"[A-Za-z0-9_!.*'() &$=@;:+,?-]+")
MAX_SEGMENT_CHARS = 200
MAX_KEY_BYTES = 900


class InvalidStorageKey(TerminalError, ValueError):
    """A key no sink may use; a ``TerminalError`` for the queue, a ``ValueError`` for callers."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(
            f"refusing storage key {key!r}: {reason}",
            detail={"operation": "validate_key", "key": key, "reason": reason},
        )
        self.key = key
        self.reason = reason


class MissingCredentials(ConfigError):
    """A cloud sink's credentials are not in the environment (``auto`` then falls back to local)."""


# ``images.storage_path`` of an image that stayed on its worker's disk (local storage keeping
# the output file itself): the job's key behind this prefix. Never a host path (web users read
# this column; the file's path is in the worker-only ``image_internals``) and never a bare key
# that a signed URL would look for in vain.
LOCAL_PREFIX = "local:"


def object_key(owner_user_id: UUID, job_id: UUID, extension: str, index: int = 0) -> str:
    """The key of a job's image ``index``: the owner's folder, the job id, the index, the type."""
    if not re.fullmatch(r"[a-z0-9]{1,10}", extension):
        raise ValueError(f"not a file extension: {extension!r}")
    if index < 0:
        raise ValueError(f"not an image index: {index}")
    suffix = f"-{index}" if index else ""
    return f"{UUID(str(owner_user_id))}/{UUID(str(job_id))}{suffix}.{extension}"


def thumbnail_key(owner_user_id: UUID, job_id: UUID, index: int = 0) -> str:
    """The key of image ``index``'s thumbnail, in the job's own folder beside its previews."""
    if index < 0:
        raise ValueError(f"not an image index: {index}")
    return f"{UUID(str(owner_user_id))}/{UUID(str(job_id))}/{index}.thumb.webp"


def check_key(key: str) -> list[str]:
    """Return the key's segments, or raise ``InvalidStorageKey`` saying what is wrong."""
    if not isinstance(key, str) or not key:
        raise InvalidStorageKey(str(key), "the key is empty")
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise InvalidStorageKey(key, f"longer than {MAX_KEY_BYTES} bytes")
    segments = key.split("/")
    for segment in segments:
        if segment == "":
            raise InvalidStorageKey(key, "empty path segment (leading, trailing or double '/')")
        if segment in (".", ".."):
            raise InvalidStorageKey(key, f"{segment!r} path segment")
        if len(segment) > MAX_SEGMENT_CHARS:
            raise InvalidStorageKey(key, f"a path segment is longer than {MAX_SEGMENT_CHARS} characters")
        if not _SEGMENT.fullmatch(segment):
            bad = sorted({ch for ch in segment if not _SEGMENT.fullmatch(ch)})
            raise InvalidStorageKey(
                key, f"characters outside ASCII letters, digits and _/!.*'() &$=@;:+,?- : {''.join(bad)!r}"
            )
    return segments


def encode_key(key: str) -> str:
    """The key as a URL path: every segment checked, then percent-encoded on its own."""
    return "/".join(quote(segment, safe="") for segment in check_key(key))


PREVIEW_EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png"}


def preview_key(owner: UUID | None, job_id: UUID, mime_type: str) -> str:
    """Where a job's live preview goes: ``<owner>/<job id>/preview.jpg`` (``.png`` for PNG
    frames); a job without an owner (the operator's) uses ``jobs/<job id>/...``."""
    folder = str(owner) if owner is not None else "jobs"
    return f"{folder}/{job_id}/preview.{PREVIEW_EXTENSIONS.get(mime_type, 'jpg')}"
