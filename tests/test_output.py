"""Local file names are safe and readable; storage keys belong to (owner, job) alone."""

from __future__ import annotations

import io
import json
import os
import re
import struct
import uuid
import zlib
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest
from PIL import Image

from imagen_worker import output
from imagen_worker.errors import RetryableError
from imagen_worker.output import (
    ImageFacts,
    check_naming,
    claim_path,
    encode,
    image_facts,
    plan_names,
    slugify,
    thumbnail,
)
from imagen_worker.storage.keys import object_key, thumbnail_key

JOB = uuid.UUID("12345678-1234-4234-8234-123456789abc")
OWNER = uuid.UUID("00000000-0000-4000-8000-00000000a11c")


@pytest.mark.parametrize(
    ("prompt", "slug"),
    [
        ("A Red Fox, in the Snow!", "a-red-fox-in-the-snow"),
        ("Café crème brûlée", "cafe-creme-brulee"),
        ("画像", "image"),
        ("../../etc/passwd", "etc-passwd"),
        ("x" * 100, "x" * 40),
        ("   ", "image"),
    ],
)
def test_slugs_are_lowercase_ascii_and_at_most_40_chars(prompt: str, slug: str) -> None:
    assert slugify(prompt) == slug


@pytest.mark.parametrize(
    "prompt",
    ["../../../../etc/cron.d/evil", "/absolute/path", "a\\b\\c", "con\x00trol", "." * 50, "画像/" * 30],
)
def test_nothing_a_prompt_contains_leaves_the_output_directory(prompt: str, tmp_path: Path) -> None:
    names = plan_names(
        "{date}-{slug}-{seed}.{ext}", prompt=prompt, seed=7, backend="mock", mime_type="image/png",
        job_id=JOB, owner_user_id=OWNER, when=datetime(2026, 5, 11, 23, 59),
    )  # fmt: skip
    target = (tmp_path / names.relative).resolve()
    assert target.parent == tmp_path.resolve()
    assert names.storage_key == f"{OWNER}/{JOB}.png"


def test_the_local_name_keeps_the_date_of_its_own_time_zone() -> None:
    late_evening_west = datetime(2026, 5, 11, 23, 30, tzinfo=timezone(timedelta(hours=-7)))
    names = plan_names(
        "{date}/{slug}-{seed}.{ext}", prompt="owl", seed=1, backend="mock", mime_type="image/webp",
        job_id=JOB, owner_user_id=OWNER, when=late_evening_west,
    )  # fmt: skip
    assert str(names.relative) == "2026-05-11/owl-1.webp"


@pytest.mark.parametrize("when", [datetime(2026, 5, 11, 23, 59), datetime(2031, 1, 1, 0, 0)])
@pytest.mark.parametrize("prompt", ["owl", "a red fox", "x" * 300])
def test_the_storage_key_depends_on_owner_and_job_only(when: datetime, prompt: str) -> None:
    names = plan_names(
        "{date}-{slug}-{seed}.{ext}", prompt=prompt, seed=when.minute, backend="mock",
        mime_type="image/png", job_id=JOB, owner_user_id=OWNER, when=when,
    )  # fmt: skip
    assert names.storage_key == f"{OWNER}/{JOB}.png"


def test_two_owners_never_share_a_key_even_with_the_same_job_id_prefix() -> None:
    other_job = uuid.UUID("12345678-0000-4000-8000-000000000000")
    other_owner = uuid.UUID("00000000-0000-4000-8000-000000000b0b")
    keys = {
        plan_names("{slug}.{ext}", prompt="fox", seed=1, backend="mock", mime_type="image/png",
                   job_id=job, owner_user_id=owner, when=datetime(2026, 5, 11)).storage_key
        for owner in (OWNER, other_owner) for job in (JOB, other_job)
    }  # fmt: skip
    assert len(keys) == 4


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("{date}-{user}.{ext}", "unknown placeholder"),
        ("{date}-{slug}.png", "{ext}"),
        ("/etc/{slug}.{ext}", "relative path"),
        ("../{slug}.{ext}", "relative path"),
    ],
)
def test_naming_templates_are_checked(template: str, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        check_naming(template)


def test_a_name_taken_by_another_job_gets_a_job_suffix_but_a_retry_reuses_its_own(tmp_path: Path) -> None:
    relative = Path("fox-1.png")
    (tmp_path / "fox-1.png").write_bytes(b"other")
    (tmp_path / "fox-1.png.json").write_text(json.dumps({"job_id": str(uuid.uuid4())}))
    assert claim_path(tmp_path, relative, JOB).name == "fox-1-12345678.png"

    (tmp_path / "fox-1.png.json").write_text(json.dumps({"job_id": str(JOB)}))
    assert claim_path(tmp_path, relative, JOB).name == "fox-1.png"


def test_a_claimed_name_is_reserved_at_once_so_a_second_job_claiming_it_gets_its_own(tmp_path: Path) -> None:
    other = uuid.UUID("87654321-0000-4000-8000-000000000000")

    first = claim_path(tmp_path, Path("day/fox-1.png"), JOB)  # nothing written yet
    second = claim_path(tmp_path, Path("day/fox-1.png"), other)

    assert (first.name, second.name) == ("fox-1.png", "fox-1-87654321.png")
    assert first.read_bytes() == b"" and second.read_bytes() == b"", "reserved, empty until written"


def _encoded(fmt: str, size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 90)).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("fmt", "mime"), [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")]
)
def test_image_facts_come_from_the_file_not_from_what_was_declared(fmt: str, mime: str) -> None:
    data = _encoded(fmt, (24, 16))

    facts = image_facts(data, "application/octet-stream")

    assert (facts.width, facts.height, facts.mime_type) == (24, 16, mime)


def test_a_file_that_is_no_still_image_keeps_the_declared_type_and_no_size() -> None:
    assert image_facts(b"\x00\x00\x00\x18ftypmp42", "video/mp4; codecs=x") == ImageFacts(
        None, None, "video/mp4"
    )
    assert image_facts(b"\x89PNG\r\n\x1a\ntruncated", "image/png") == ImageFacts(None, None, "image/png")


def _count_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = os.fsync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    return calls


def test_an_image_is_fsynced_with_its_directory_and_a_sidecar_or_cache_is_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _count_fsyncs(monkeypatch)
    image = tmp_path / "a.png"
    output.write_image(image, b"png")
    assert len(calls) == 2, "the file, then the directory that holds the rename"
    output.write_sidecar(image, {"job_id": "x"})
    output.write_copy(tmp_path / ".journal" / "x.json", b"{}")
    assert len(calls) == 2
    assert image.read_bytes() == b"png" and output.sidecar_path(image).is_file()


async def test_one_job_through_the_pipeline_costs_two_fsyncs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from imagen_worker.backends.mock import MockBackend
    from imagen_worker.config import OutputConfig
    from imagen_worker.pipeline import Pipeline
    from imagen_worker.queue.jobs import JobSpec
    from imagen_worker.storage.local import LocalSink
    from tests.test_pipeline import CountingContext

    backend = MockBackend.from_config("mock", {"type": "mock", "latency_ms": 0})
    sink = LocalSink.from_config({"type": "local"}, output_directory=tmp_path)
    pipe = Pipeline({"mock": backend}, "mock", sink, OutputConfig(directory=tmp_path))
    calls = _count_fsyncs(monkeypatch)
    spec = JobSpec(owner_user_id=uuid.uuid4(), prompt="a heron", width=64, height=64)
    artifact = await pipe.run(uuid.uuid4(), spec, CountingContext())
    assert artifact.image_path.is_file() and artifact.sidecar_path and artifact.sidecar_path.is_file()
    assert len(calls) == 2, "image file and its directory; the sidecar and journal are not fsynced"


def _png_with_comfy_chunks(**options: Any) -> bytes:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", '{"3": {"class_type": "KSampler"}}')
    info.add_text("workflow", '{"nodes": []}')
    out = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(out, format="PNG", pnginfo=info, **options)
    return out.getvalue()


XMP = {
    "dc": "http://purl.org/dc/elements/1.1/",
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
    "xmp": "http://ns.adobe.com/xap/1.0/",
    "imagen": output.XMP_NAMESPACE,
}
EMBEDDED = {"imagen": {"prompt": "a heron", "seed": 7, "workflow": {"3": {"class_type": "KSampler"}}}}


def test_png_keeps_its_workflow_chunks_and_gains_the_imagen_chunk() -> None:

    data, facts, _ = encode(_png_with_comfy_chunks(), "png", 90, EMBEDDED)
    with Image.open(io.BytesIO(data)) as image:
        assert facts == ImageFacts(40, 30, "image/png") and image.format == "PNG"
        assert json.loads(image.info["imagen"]) == EMBEDDED["imagen"]
        assert image.info["workflow"] == '{"nodes": []}'


def test_without_the_backends_text_a_png_keeps_only_ours() -> None:
    ours = {"imagen": {"prompt": "a heron", "seed": 7}}
    exif = Image.Exif()
    exif[0x010F] = "a camera maker"
    with_exif = _png_with_comfy_chunks(exif=exif)  # decoded and written again
    assert b"eXIf" in with_exif
    for source in (_png_with_comfy_chunks(), with_exif):
        data, _, _ = encode(source, "png", 90, ours, backend_text=False)
        with Image.open(io.BytesIO(data)) as image:
            assert json.loads(image.info["imagen"]) == ours["imagen"]
            assert not {"prompt", "workflow"} & set(image.info), "ComfyUI's own chunks are gone"


def test_a_png_that_stays_png_keeps_its_pixel_data_byte_for_byte() -> None:

    source = _png_with_comfy_chunks()
    embedded, _, _ = encode(source, "png", 90, {"imagen": {"prompt": "un héron sous la pluie ☔"}})
    stripped, _, _ = encode(source, "png", 90, None)

    def pixel_data(png: bytes) -> bytes:
        start = png.index(b"IDAT") - 4
        return png[start : png.index(b"IEND") - 4]

    assert pixel_data(embedded) == pixel_data(stripped) == pixel_data(source)
    with Image.open(io.BytesIO(embedded)) as image:
        image.load()
        assert json.loads(image.info["imagen"])["prompt"] == "un héron sous la pluie ☔"


@pytest.mark.parametrize("fmt", ["png", "webp"])
def test_a_damaged_png_is_refused_in_words_not_stored(fmt: str) -> None:

    damaged = bytearray(_png_with_comfy_chunks())
    damaged[damaged.index(b"IDAT") + 6] ^= 0xFF  # the chunk's CRC no longer matches

    with pytest.raises(RetryableError) as refused:
        encode(bytes(damaged), fmt, 90, EMBEDDED, declared_mime="image/png")

    assert refused.value.message == "the backend's PNG image is damaged and cannot be read"


def test_an_image_too_large_to_decode_here_is_kept_as_produced() -> None:

    huge = bytearray(_png_with_comfy_chunks())
    huge[16:24] = struct.pack(">II", 40_000, 40_000)  # IHDR: 1.6 gigapixels, over Pillow's limit
    huge[29:33] = struct.pack(">I", zlib.crc32(bytes(huge[12:29])))

    data, facts, _ = encode(bytes(huge), "webp", 80, EMBEDDED, declared_mime="image/png")

    assert data == bytes(huge) and facts == ImageFacts(None, None, "image/png")


@pytest.mark.parametrize(("fmt", "pillow"), [("webp", "WEBP"), ("jpeg", "JPEG")])
def test_webp_and_jpeg_carry_the_metadata_in_exif(fmt: str, pillow: str) -> None:

    data, facts, _ = encode(_png_with_comfy_chunks(), fmt, 80, EMBEDDED)
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == pillow and image.size == (40, 30)
        assert facts == ImageFacts(40, 30, f"image/{fmt}")
        assert json.loads(image.getexif()[0x010E]) == EMBEDDED


def _xmp(image: Image.Image) -> ElementTree.Element:
    return ElementTree.fromstring(image.info["xmp"])


@pytest.mark.parametrize(("fmt", "pillow"), [("webp", "WEBP"), ("jpeg", "JPEG")])
def test_webp_and_jpeg_carry_an_xmp_packet_with_prompt_seed_and_the_whole_metadata(
    fmt: str, pillow: str
) -> None:

    embedded = {"imagen": {**EMBEDDED["imagen"], "prompt": "a heron <at> dawn & dusk", "model": "sd15"}}
    data, _, _ = encode(_png_with_comfy_chunks(), fmt, 80, embedded)
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == pillow
        xmp = _xmp(image)
    assert xmp.findtext(".//dc:description/rdf:Alt/rdf:li", namespaces=XMP) == "a heron <at> dawn & dusk"
    assert xmp.findtext(".//xmp:CreatorTool", namespaces=XMP) == "imagen-worker"
    assert xmp.findtext(".//imagen:seed", namespaces=XMP) == "7"
    assert xmp.findtext(".//imagen:model", namespaces=XMP) == "sd15"
    assert json.loads(xmp.findtext(".//imagen:metadata", namespaces=XMP) or "") == embedded
    # The source PNG's own ComfyUI chunks are not carried into another format, as before.
    assert b'"nodes": []' not in data


def test_characters_xml_cannot_hold_do_not_break_the_xmp_packet() -> None:

    embedded = {"imagen": {"prompt": "bell \x07 and tab\t", "seed": 1}}
    data, _, _ = encode(_png_with_comfy_chunks(), "webp", 80, embedded)
    with Image.open(io.BytesIO(data)) as image:
        xmp = _xmp(image)
    assert xmp.findtext(".//dc:description/rdf:Alt/rdf:li", namespaces=XMP) == "bell \ufffd and tab\t"
    assert json.loads(xmp.findtext(".//imagen:metadata", namespaces=XMP) or "") == embedded


def test_a_jpeg_leaves_out_a_workflow_too_large_for_its_segments_and_keeps_the_rest() -> None:

    huge = {"imagen": {"prompt": "a heron", "seed": 7, "workflow": {"1": {"text": "x" * 70_000}}}}
    jpeg, _, _ = encode(_png_with_comfy_chunks(), "jpeg", 80, huge)
    webp, _, _ = encode(_png_with_comfy_chunks(), "webp", 80, huge)
    with Image.open(io.BytesIO(jpeg)) as image:
        described = json.loads(image.getexif()[0x010E])
        in_xmp = json.loads(_xmp(image).findtext(".//imagen:metadata", namespaces=XMP) or "")
    assert described == in_xmp
    assert described["imagen"]["prompt"] == "a heron" and "workflow" not in described["imagen"]
    assert described["imagen"]["workflow_omitted"] == "too large for a JPEG; see the sidecar"
    with Image.open(io.BytesIO(webp)) as image:  # a WebP chunk has no such limit
        assert json.loads(image.getexif()[0x010E]) == huge


def test_a_jpeg_whose_prompt_alone_is_too_large_keeps_seed_steps_and_model() -> None:
    prompt = ("雪の中の赤い狐" * 1200)[:8000]  # the longest prompt, three bytes a character
    embedded: dict[str, Any] = {
        "imagen": {
            "prompt": prompt,
            "negative_prompt": None,
            "seed": 7,
            "steps": 20,
            "model": "sd15",
            "params": {},
        }
    }
    jpeg, _, _ = encode(_png_with_comfy_chunks(), "jpeg", 80, embedded)
    with Image.open(io.BytesIO(jpeg)) as image:
        described = json.loads(image.getexif()[0x010E])
        assert _xmp(image).findtext(".//imagen:seed", namespaces=XMP) == "7"
    assert {key: described["imagen"][key] for key in ("seed", "steps", "model")} == {
        "seed": 7,
        "steps": 20,
        "model": "sd15",
    }
    assert "prompt" not in described["imagen"]
    assert described["imagen"]["prompt_omitted"] == "too large for a JPEG; see the sidecar"


def test_png_output_keeps_text_chunks_and_gets_no_xmp() -> None:

    data, _, _ = encode(_png_with_comfy_chunks(), "png", 90, EMBEDDED)
    with Image.open(io.BytesIO(data)) as image:
        assert "xmp" not in image.info and image.info["prompt"] == '{"3": {"class_type": "KSampler"}}'


@pytest.mark.parametrize("fmt", ["png", "webp", "jpeg"])
def test_embed_metadata_false_strips_every_chunk(fmt: str) -> None:

    data, _, _ = encode(_png_with_comfy_chunks(), fmt, 80, None)
    with Image.open(io.BytesIO(data)) as image:
        assert not image.getexif()
        assert not {"prompt", "workflow", "imagen", "exif", "xmp"} & set(image.info)
    assert b"KSampler" not in data and b"x:xmpmeta" not in data and b"ns.adobe.com/xap" not in data


def _turned_camera_image(fmt: str = "JPEG") -> bytes:
    """400x200 stored pixels whose EXIF says: turn 90 degrees clockwise; a camera's make, and
    where it was (GPS)."""
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    exif[0x010F] = "a camera maker"  # Make
    exif[0x8825] = {1: "N", 2: (48.0, 51.0, 29.0)}  # GPSInfo: latitude
    out = io.BytesIO()
    Image.new("RGB", (400, 200), (200, 30, 30)).save(out, format=fmt, exif=exif)
    return out.getvalue()


@pytest.mark.parametrize("source", ["JPEG", "PNG"])
@pytest.mark.parametrize("fmt", ["png", "webp", "jpeg"])
def test_a_turned_camera_image_is_written_upright_and_with_none_of_the_cameras_metadata(
    source: str, fmt: str
) -> None:
    # A PNG with an eXIf chunk too: its text chunks alone are rewritten otherwise.
    for metadata in (EMBEDDED, None):
        data, facts, _ = encode(_turned_camera_image(source), fmt, 80, metadata)
        with Image.open(io.BytesIO(data)) as image:
            assert image.size == (200, 400) and (facts.width, facts.height) == (200, 400)
            exif = image.getexif()
            assert 0x0112 not in exif and 0x010F not in exif and 0x8825 not in exif


def test_what_cannot_be_decoded_keeps_its_bytes_and_the_type_the_backend_declared() -> None:

    video = b"\x00\x00\x00\x18ftypmp42" + bytes(64)
    for fmt in ("png", "webp", "jpeg"):
        assert encode(video, fmt, 80, EMBEDDED, declared_mime="video/mp4") == (
            video, ImageFacts(None, None, "video/mp4"), None,
        )  # fmt: skip


def test_quality_changes_the_lossy_size() -> None:

    noisy = Image.effect_noise((128, 128), 64).convert("RGB")
    out = io.BytesIO()
    noisy.save(out, format="PNG")
    low, _, _ = encode(out.getvalue(), "jpeg", 10, None)
    high, _, _ = encode(out.getvalue(), "jpeg", 95, None)
    assert len(low) < len(high)


def test_a_thumbnail_is_a_small_webp_keeping_the_aspect_ratio() -> None:

    out = io.BytesIO()
    Image.new("RGB", (1024, 512)).save(out, format="PNG")
    small = thumbnail(out.getvalue(), 256)
    assert small is not None
    with Image.open(io.BytesIO(small)) as image:
        assert (image.format, image.size) == ("WEBP", (256, 128))
    assert thumbnail(b"not an image", 256) is None


def test_a_thumbnail_is_upright_when_the_camera_said_the_image_is_turned() -> None:

    small = thumbnail(_turned_camera_image(), 256)
    assert small is not None
    with Image.open(io.BytesIO(small)) as image:
        assert image.size == (128, 256)
        assert not image.getexif(), "a thumbnail carries no metadata"


def test_a_format_change_gives_the_thumbnail_from_the_same_decode_and_a_png_leaves_it_to_later() -> None:

    out = io.BytesIO()
    Image.new("RGBA", (1024, 512), (10, 200, 30, 128)).save(out, format="PNG")
    source = out.getvalue()

    as_jpeg = encode(source, "jpeg", 80, None, thumbnail_size=256)
    assert as_jpeg.thumbnail is not None
    with Image.open(io.BytesIO(as_jpeg.thumbnail)) as small:
        assert (small.format, small.size, small.mode) == ("WEBP", (256, 128), "RGB"), (
            "no alpha: the JPEG has none"
        )
    assert encode(source, "png", 80, None, thumbnail_size=256).thumbnail is None
    assert encode(source, "webp", 80, None).thumbnail is None, "none asked for"


def test_batch_keys_are_a_pure_function_of_owner_job_and_index() -> None:

    assert object_key(OWNER, JOB, "webp", 0) == f"{OWNER}/{JOB}.webp"
    assert object_key(OWNER, JOB, "webp", 3) == f"{OWNER}/{JOB}-3.webp"
    assert thumbnail_key(OWNER, JOB, 3) == f"{OWNER}/{JOB}/3.thumb.webp"
    with pytest.raises(ValueError):
        object_key(OWNER, JOB, "png", -1)


def _png(image: Image.Image, **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", **options)
    return out.getvalue()


def test_transparent_parts_of_a_jpeg_are_white_not_the_colour_hidden_under_them() -> None:
    hidden = Image.new("RGBA", (64, 64), (255, 0, 0, 0))  # fully transparent red

    data, _, _ = encode(_png(hidden), "jpeg", 95, None)

    with Image.open(io.BytesIO(data)) as image:
        red, green, blue = image.convert("RGB").getpixel((32, 32))  # type: ignore[misc]
    assert min(red, green, blue) > 245


def test_a_palette_image_with_transparency_keeps_it_in_its_thumbnail() -> None:
    palette = Image.new("P", (64, 64), 0)
    palette.putpalette([255, 0, 0] + [0, 0, 0] * 255)

    small = thumbnail(_png(palette, transparency=0), 32)

    assert small is not None
    with Image.open(io.BytesIO(small)) as image:
        assert image.mode == "RGBA" and image.getpixel((16, 16))[3] == 0  # type: ignore[index]


@pytest.mark.parametrize("fmt", ["png", "webp", "jpeg"])
def test_the_colour_profile_stays_in_every_format(fmt: str) -> None:
    from PIL import ImageCms

    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    source = _png(Image.new("RGB", (64, 64), (10, 200, 30)), icc_profile=profile)

    data, _, _ = encode(source, fmt, 80, EMBEDDED)

    with Image.open(io.BytesIO(data)) as image:
        assert image.info.get("icc_profile") == profile
