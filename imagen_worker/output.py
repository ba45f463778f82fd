"""Local output: file names from ``output.naming``, the image file and its JSON sidecar.

The name is built from placeholders only, and every placeholder value is reduced to safe
characters, so nothing a prompt contains can leave the output directory. The same date is
used for every placeholder of one file, so its parts never drift apart across midnight. The
storage key does not depend on the name: it is ``<owner id>/<job id>.<ext>``
(``storage.keys.object_key``), the same on every host and attempt.

``encode`` turns what a backend produced into the format the job asks for (``png``, ``webp``,
``jpeg``), with the prompt, seed and workflow embedded (PNG text chunks; EXIF and an XMP packet
for WebP and JPEG) or every metadata chunk stripped; ``thumbnail`` makes the small WebP a gallery
shows. Both are CPU work: callers run them in a thread. A PNG that stays PNG (what ComfyUI
saves) is never decoded: its text chunks are rewritten and its pixel data kept byte for byte,
which for a 1024x1024 image saves a full recompression.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import string
import struct
import unicodedata
import zlib
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple
from uuid import UUID
from xml.sax.saxutils import escape

from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from imagen_worker.errors import ConfigError, RetryableError
from imagen_worker.storage.keys import object_key

PLACEHOLDERS = frozenset({"date", "time", "slug", "seed", "backend", "ext", "id"})
_EXTENSIONS = {
    "image/png": "png",
    "image/jpeg": "jpg",
    "image/webp": "webp",
    "image/gif": "gif",
    "video/mp4": "mp4",
    "video/webm": "webm",
}


_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}
# What a job may ask for (jobs.format, output.format) and how Pillow writes it.
PILLOW_FORMAT = {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG"}
MIME_OF_FORMAT = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}
_EXIF_IMAGE_DESCRIPTION = 0x010E
_EXIF_SOFTWARE = 0x0131
# The XMP namespace of our own properties (``imagen:seed``, ``imagen:metadata``...).
XMP_NAMESPACE = "urn:imagen-worker:xmp:1.0#"
# A JPEG segment holds 65533 bytes after its length; EXIF and XMP each take one segment, less
# their identifiers ("Exif\0\0", "http://ns.adobe.com/xap/1.0/\0") and some headroom.
_JPEG_SEGMENT_BYTES = 65000


@dataclass(frozen=True)
class ImageFacts:
    """What the produced file itself says: the images row records these, never the request."""

    width: int | None
    height: int | None
    mime_type: str


class Encoded(NamedTuple):
    data: bytes
    facts: ImageFacts  # of ``data``, known while encoding: the file is never parsed again
    # Made from the same decode when encoding had to decode the image (a format change);
    # None otherwise: ``thumbnail`` makes it from ``data``.
    thumbnail: bytes | None = None


def encode(
    data: bytes,
    fmt: str,
    quality: int,
    metadata: Mapping[str, Any] | None,
    *,
    declared_mime: str = "application/octet-stream",
    thumbnail_size: int = 0,
    backend_text: bool = True,
) -> Encoded:
    """The image in ``fmt``, with ``metadata`` embedded, or with no metadata at all when None.

    PNG gets one text chunk per key (a ComfyUI PNG's own ``prompt``/``workflow`` chunks are
    kept only when metadata is embedded and ``backend_text`` is set); WebP and JPEG get the
    metadata as JSON in the EXIF ImageDescription and as an XMP packet (``xmp_packet``). A JPEG
    segment holds under 64 KiB, so a JPEG whose metadata is larger embeds it without the
    workflow graph (``_fit_jpeg_segment``). Bytes Pillow
    cannot read (a video) are returned as they are, under ``declared_mime``; a PNG, WebP or
    JPEG that cannot be read raises ``RetryableError``. An image whose EXIF says it is turned
    is written upright, in every format. With ``thumbnail_size``, an image decoded here also
    gives its thumbnail: a second decode of a 1024 px WebP costs about 7 ms.
    """
    if fmt == "png":
        rewritten = _png_text_rewritten(data, metadata, backend_text)
        if rewritten is not None:
            return Encoded(rewritten, _png_facts(rewritten))
    try:
        source = Image.open(io.BytesIO(data))
        source.load()
    except Image.DecompressionBombError:  # too many pixels to decode safely here: kept as it is
        return Encoded(data, image_facts(data, declared_mime))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        facts = image_facts(data, declared_mime)
        if facts.mime_type in MIME_OF_FORMAT.values():
            # It says it is a PNG, WebP or JPEG and cannot be read: storing it would hand the
            # user a broken file under a job marked done.
            raise RetryableError(
                f"the backend's {facts.mime_type.split('/')[1].upper()} image is damaged and cannot be read",
                detail={"mime_type": facts.mime_type, "bytes": len(data), "error": str(exc)},
            ) from None
        return Encoded(data, facts)
    with source:
        # In place: a copy of a decoded 1024 px image costs 5 ms of fresh memory here.
        ImageOps.exif_transpose(source, in_place=True)
        image = _savable(source, fmt)
        text = source.info if source.format == "PNG" and backend_text else {}
        encoded = _saved(image, fmt, quality, metadata, text, source.info.get("icc_profile"))
        facts = ImageFacts(width=image.width, height=image.height, mime_type=MIME_OF_FORMAT[fmt])
        small = None
        if thumbnail_size:
            with contextlib.suppress(OSError, ValueError):  # no thumbnail is no reason to fail
                small = _thumbnail_of(image, thumbnail_size)  # shrinks ``image``: facts first
    return Encoded(encoded, facts, small)


def _has_alpha(image: Image.Image) -> bool:
    return "A" in image.mode or "transparency" in image.info


def _savable(image: Image.Image, fmt: str) -> Image.Image:
    """``image`` in a mode ``fmt`` can hold. A JPEG has no alpha: transparent parts go white,
    as a viewer shows them, not the colour that happened to sit under them."""
    if fmt == "jpeg" and image.mode not in ("RGB", "L"):
        if not _has_alpha(image):
            return image.convert("RGB")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    if image.mode not in ("RGB", "RGBA", "L", "LA"):
        return image.convert("RGBA" if _has_alpha(image) else "RGB")
    return image


def _saved(
    image: Image.Image,
    fmt: str,
    quality: int,
    metadata: Mapping[str, Any] | None,
    text: Mapping[Any, Any],
    icc: bytes | None = None,
) -> bytes:
    """``image`` saved as ``fmt``; a PNG keeps ``text`` (the source's own chunks) with the metadata.
    Every format keeps the source's colour profile (``icc``): its colours mean what they meant."""
    options: dict[str, Any] = {"icc_profile": icc} if icc else {}
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        if metadata is not None:
            for key, value in text.items():
                if isinstance(key, str) and isinstance(value, str) and key not in metadata:
                    info.add_text(key, value)
            for key, value in metadata.items():
                info.add_text(key, value if isinstance(value, str) else json.dumps(value, default=str))
        options.update(pnginfo=info, compress_level=6)
    else:
        options.update(quality=quality)
        if metadata is not None:
            fitted = _fit_jpeg_segment(metadata) if fmt == "jpeg" else metadata
            if fitted is not None:
                exif = Image.Exif()
                exif[_EXIF_IMAGE_DESCRIPTION] = _json(fitted)
                exif[_EXIF_SOFTWARE] = "imagen-worker"
                options.update(exif=exif.tobytes(), xmp=xmp_packet(fitted))
    out = io.BytesIO()
    image.save(out, format=PILLOW_FORMAT[fmt], **options)
    return out.getvalue()


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Chunks that say something about the image's origin rather than its pixels: text (tEXt,
# zTXt, iTXt), EXIF and the modification time. Everything else (IHDR, PLTE, IDAT, colour
# information, transparency) is kept.
_PNG_METADATA_CHUNKS = frozenset({b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"tIME"})


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]] | None:
    """A PNG's chunks as (type, body), every CRC checked; None when it is not a whole PNG."""
    if not data.startswith(_PNG_SIGNATURE):
        return None
    chunks: list[tuple[bytes, bytes]] = []
    at = len(_PNG_SIGNATURE)
    while at + 12 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, at)
        end = at + 12 + length
        if end > len(data):
            return None
        body = data[at + 8 : at + 8 + length]
        if zlib.crc32(kind + body) != struct.unpack_from(">I", data, end - 4)[0]:
            return None
        chunks.append((kind, body))
        at = end
        if kind == b"IEND":
            break
    if not chunks or chunks[0][0] != b"IHDR" or chunks[-1][0] != b"IEND" or at != len(data):
        return None
    if not any(kind == b"IDAT" for kind, _ in chunks):
        return None
    return chunks


def _png_text(key: str, value: str) -> tuple[bytes, bytes]:
    """An uncompressed iTXt chunk: UTF-8, so any prompt survives."""
    return b"iTXt", key.encode("latin-1")[:79] + b"\0\0\0\0\0" + value.encode("utf-8")


def _png_text_key(kind: bytes, body: bytes) -> str | None:
    if kind not in (b"tEXt", b"zTXt", b"iTXt"):
        return None
    return body.split(b"\0", 1)[0].decode("latin-1")


def _png_text_rewritten(
    data: bytes, metadata: Mapping[str, Any] | None, backend_text: bool = True
) -> bytes | None:
    """The PNG with its metadata chunks replaced, pixels untouched; None if it is no valid PNG.

    With ``metadata`` the file keeps its own text chunks (ComfyUI's ``prompt`` and
    ``workflow``) except those ``metadata`` replaces, unless ``backend_text`` is off, and gains
    one chunk per key; without it every metadata chunk goes.
    """
    chunks = _png_chunks(data)
    if chunks is None or any(kind == b"eXIf" for kind, _ in chunks):
        # EXIF may turn the image (decoded and written upright instead) and may say where it
        # was made (GPS): never ours to pass on. No backend known here writes one.
        return None

    def keep(kind: bytes, body: bytes) -> bool:
        if kind not in _PNG_METADATA_CHUNKS:
            return True
        return metadata is not None and backend_text and _png_text_key(kind, body) not in metadata

    kept = [(kind, body) for kind, body in chunks if keep(kind, body)]
    if metadata is not None:
        # Before the image data, where every reader looks without decoding the pixels.
        first_data = next(i for i, (kind, _) in enumerate(kept) if kind == b"IDAT")
        kept[first_data:first_data] = [
            _png_text(key, value if isinstance(value, str) else json.dumps(value, default=str))
            for key, value in metadata.items()
        ]
    out = [_PNG_SIGNATURE]
    for kind, body in kept:
        out.append(struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body)))
    return b"".join(out)


def _png_facts(png: bytes) -> ImageFacts:
    """A whole PNG's size, from its IHDR chunk (always first, right after the signature)."""
    width, height = struct.unpack_from(">II", png, len(_PNG_SIGNATURE) + 8)
    return ImageFacts(width=width, height=height, mime_type="image/png")


def _json(metadata: Mapping[str, Any]) -> str:
    return json.dumps(metadata, default=str, ensure_ascii=True)


# Characters XML 1.0 does not allow at all, not even escaped.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _xml_text(text: str) -> str:
    return escape(_NOT_XML.sub("\ufffd", text))


def xmp_packet(metadata: Mapping[str, Any]) -> bytes:
    """An XMP packet: ``dc:description`` (the prompt), ``xmp:CreatorTool``, and in the imagen
    namespace the seed, model and the whole metadata as JSON (what EXIF carries too).

    XMP is what photo managers and web tools read; EXIF ImageDescription alone is often shown
    as a caption or dropped.
    """
    imagen = metadata.get("imagen")
    facts = imagen if isinstance(imagen, Mapping) else {}
    fields = [
        "   <xmp:CreatorTool>imagen-worker</xmp:CreatorTool>",
        f"   <imagen:metadata>{_xml_text(_json(metadata))}</imagen:metadata>",
    ]
    if isinstance(facts.get("prompt"), str):
        fields.insert(0, (
            "   <dc:description><rdf:Alt><rdf:li xml:lang=\"x-default\">"
            f"{_xml_text(facts['prompt'])}</rdf:li></rdf:Alt></dc:description>"
        ))  # fmt: skip
    for key in ("seed", "model"):
        if facts.get(key) is not None:
            fields.append(f"   <imagen:{key}>{_xml_text(str(facts[key]))}</imagen:{key}>")
    body = "\n".join(fields)
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">\n'
        ' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
        '  <rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/"\n'
        '    xmlns:xmp="http://ns.adobe.com/xap/1.0/"\n'
        f'    xmlns:imagen="{XMP_NAMESPACE}">\n'
        f"{body}\n"
        "  </rdf:Description>\n"
        " </rdf:RDF>\n"
        "</x:xmpmeta>\n"
        '<?xpacket end="w"?>'
    ).encode()


# What a JPEG leaves out, in turn, when its metadata does not fit one segment; the sidecar keeps
# everything. Seed, steps and model always fit, so an image never loses what makes it again.
_JPEG_OMISSIONS = (("workflow",), ("workflow", "prompt", "negative_prompt", "params"))


def _fit_jpeg_segment(metadata: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """``metadata`` as it fits one JPEG segment: whole, else without the workflow graph, else
    without the prompts and params too (an 8,000-character prompt in a script of three bytes a
    character), each omission named in the metadata."""
    if len(xmp_packet(metadata)) <= _JPEG_SEGMENT_BYTES:
        return metadata
    imagen = metadata.get("imagen")
    if not isinstance(imagen, Mapping):
        return None
    for omitted in _JPEG_OMISSIONS:
        rest = {key: value for key, value in imagen.items() if key not in omitted}
        notes = {
            f"{key}_omitted": "too large for a JPEG; see the sidecar" for key in omitted if key in imagen
        }
        slim = {**metadata, "imagen": {**rest, **notes}}
        if len(xmp_packet(slim)) <= _JPEG_SEGMENT_BYTES:
            return slim
    return None


def thumbnail(data: bytes, size: int) -> bytes | None:
    """A WebP at most ``size`` pixels on its longer side, without metadata; None for non-images."""
    try:
        with Image.open(io.BytesIO(data)) as source:
            # In place: a transposed copy of a 1024 px image cost 5 ms of fresh memory here,
            # half of the whole thumbnail, even when there was nothing to turn.
            ImageOps.exif_transpose(source, in_place=True)
            return _thumbnail_of(source, size)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None


def _thumbnail_of(image: Image.Image, size: int) -> bytes:
    """``thumbnail`` of a decoded, upright image, which this shrinks in place."""
    image.thumbnail((size, size))
    if image.mode not in ("RGB", "RGBA"):
        image = image.convert("RGBA" if _has_alpha(image) else "RGB")
    out = io.BytesIO()
    # method 0: the encoder's fastest setting, about 4x faster than its default for a
    # 256 px image at much the same size; a thumbnail is made for every image.
    image.save(out, format="WEBP", quality=80, method=0)
    return out.getvalue()


def image_facts(data: bytes, declared_mime: str) -> ImageFacts:
    """Size and type from the file's header (PNG, JPEG, WebP, GIF); only the header is parsed.

    A file Pillow does not recognise as a still image (a video, audio) keeps the MIME type the
    backend declared and records no size.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            mime = _FORMATS.get(image.format or "")
            if mime is not None:
                return ImageFacts(width=image.width, height=image.height, mime_type=mime)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        pass
    return ImageFacts(width=None, height=None, mime_type=declared_mime.split(";")[0].strip().lower())


def check_naming(template: str) -> None:
    """Refuse templates that use unknown placeholders or could leave the directory."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise ValueError(f"output.naming {template!r}: {exc}") from None
    unknown = fields - PLACEHOLDERS
    if unknown:
        raise ValueError(
            f"output.naming: unknown placeholder(s) {sorted(unknown)}; use {sorted(PLACEHOLDERS)}"
        )
    if "{ext}" not in template:
        raise ValueError("output.naming must end with the {ext} placeholder")
    if template.startswith("/") or ".." in template.split("/") or "\\" in template:
        raise ValueError("output.naming must be a relative path inside output.directory")


def slugify(text: str, limit: int = 40) -> str:
    """Lowercase ASCII letters, digits and single dashes; never empty."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    slug = slug[:limit].rstrip("-")
    return slug or "image"


def extension_for(mime_type: str) -> str:
    return _EXTENSIONS.get(mime_type.split(";")[0].strip().lower(), "bin")


@dataclass(frozen=True)
class Naming:
    """Where one job's files go, locally and in storage."""

    relative: Path
    storage_key: str


def plan_names(
    template: str,
    *,
    prompt: str,
    seed: int,
    backend: str,
    mime_type: str,
    job_id: UUID,
    owner_user_id: UUID,
    when: datetime,
    index: int = 0,
) -> Naming:
    ext = extension_for(mime_type)
    slug = slugify(prompt)
    date = when.strftime("%Y-%m-%d")
    values = {
        "date": date,
        "time": when.strftime("%H%M%S"),
        "slug": slug,
        "seed": str(seed),
        "backend": slugify(backend, 64),
        "ext": ext,
        "id": job_id.hex[:8],
    }
    relative = Path(template.format(**values))
    if relative.is_absolute() or ".." in relative.parts:
        raise ConfigError(f"output.naming produced an unsafe path: {relative}")
    if index:
        relative = relative.with_name(f"{relative.stem}-{index}{relative.suffix}")
    return Naming(relative=relative, storage_key=object_key(owner_user_id, job_id, ext, index))


def sidecar_path(image_path: Path) -> Path:
    return image_path.with_suffix(image_path.suffix + ".json")


def _atomic_write(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write and rename, so a reader never sees half a file.

    ``durable`` also fsyncs the file and then its directory (the rename), so the file survives
    a power cut once this returns: the image must, before the database says ``done``. The
    sidecar and the journal are copies of what the database records, and skip both fsyncs.

    Plain ``os`` calls, and the directory created only when the open says it is missing: a
    worker thread releases the interpreter lock around every system call, so each one it
    saves (``open()``'s stat, isatty and seek, a mkdir per file) is a lock hand-off saved.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    try:
        handle = os.open(tmp, flags, 0o644)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = os.open(tmp, flags, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(handle, view) :]
        if durable:
            os.fsync(handle)
    except BaseException:
        os.close(handle)
        os.unlink(tmp)
        raise
    os.close(handle)
    os.replace(tmp, path)
    if durable:
        directory = os.open(path.parent, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def claim_path(directory: Path, relative: Path, job_id: UUID) -> Path:
    """The final local path, reserved for this job before anything is written.

    The name is created empty with ``O_EXCL`` (the image then replaces the empty file), so two
    jobs that name the same file at the same moment (same prompt, seed and day, in one worker
    or two on this host) never write over each other's image, thumbnail or sidecar. A name
    another job holds gets this job's id as a suffix; this job's own file from an earlier
    attempt here (its sidecar says so) is reused.
    """
    path = directory / relative
    short = path.with_name(f"{path.stem}-{job_id.hex[:8]}{path.suffix}")
    for candidate in (path, short):
        if _reserve(candidate) or _written_by(candidate, job_id):
            return candidate
    return path.with_name(f"{path.stem}-{job_id.hex}{path.suffix}")  # no other job has this one


def _reserve(path: Path) -> bool:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        handle = os.open(path, flags, 0o644)
    except FileExistsError:
        return False
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = os.open(path, flags, 0o644)
    os.close(handle)
    return True


def _written_by(path: Path, job_id: UUID) -> bool:
    try:
        return bool(json.loads(sidecar_path(path).read_text(encoding="utf-8")).get("job_id") == str(job_id))
    except (OSError, ValueError, AttributeError):
        return False


def thumbnail_path(image_path: Path) -> Path:
    """Beside the image and named after all of it, extension included: ``a.png``'s thumbnail
    is ``a.png.thumb.webp`` and can never be ``a.webp``'s."""
    return image_path.with_name(f"{image_path.name}.thumb.webp")


def write_image(path: Path, data: bytes) -> None:
    _atomic_write(path, data)


# Durable writes of a job's images, on threads of their own: fsync waits in the kernel without
# the interpreter lock, so the job's thumbnails and sidecars are made while the disk flushes.
_durable_writes = ThreadPoolExecutor(max_workers=4, thread_name_prefix="imagen-fsync")


def start_write_image(path: Path, data: bytes) -> Future[None]:
    """``write_image`` on another thread; wait for the future before anything says ``done``."""
    return _durable_writes.submit(_atomic_write, path, data)


def start_remove(path: Path) -> Future[None]:
    """Remove a cache file on another thread, for callers that need not wait.

    A system call on the event loop releases the interpreter lock and then waits to get it back
    from busy file threads; an unlink nobody waits for is better queued behind their work.
    """
    return _durable_writes.submit(path.unlink, missing_ok=True)


def write_copy(path: Path, data: bytes) -> None:
    """A cache file (the journal): atomic, not fsynced; losing it costs a re-render, never a result."""
    _atomic_write(path, data, durable=False)


def write_sidecar(image_path: Path, sidecar: Mapping[str, Any]) -> Path:
    target = sidecar_path(image_path)
    body = json.dumps(sidecar, indent=2, sort_keys=True, ensure_ascii=False, default=str)
    _atomic_write(target, body.encode("utf-8") + b"\n", durable=False)
    return target
