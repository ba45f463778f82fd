"""The one pipeline: local files first, then storage; a failed upload never loses the image."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import json
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from imagen_worker import output
from imagen_worker.backends.base import Output
from imagen_worker.backends.mock import MockBackend, render_png
from imagen_worker.config import OutputConfig
from imagen_worker.errors import ConfigError, RetryableError, TerminalError
from imagen_worker.pipeline import Pipeline, derived_seed, discard, forget
from imagen_worker.queue.jobs import ImageRecord, JobSpec
from imagen_worker.storage.base import StorageSink, StoredObject

OWNER = uuid.UUID("00000000-0000-4000-8000-000000000004")


class FlakyStore(StorageSink):
    """Storage that is down for the first ``outages`` uploads."""

    type_name = "flaky"

    def __init__(self, outages: int) -> None:
        self.outages = outages
        self.objects: dict[str, bytes] = {}

    @classmethod
    def from_config(cls, block: Any, *, output_directory: Path) -> FlakyStore:
        return cls(0)

    async def put(self, key: str, source: Path, mime_type: str) -> StoredObject:
        if self.outages:
            self.outages -= 1
            raise RetryableError("storage unavailable (503)")
        self.objects[key] = source.read_bytes()
        return StoredObject(key=key, location=f"flaky://{key}")

    async def sign(self, key: str, ttl_seconds: int) -> str:
        return f"flaky://{key}?ttl={ttl_seconds}"


class CountingContext:
    backend_ref: str | None = None
    first_claim = True
    cancel_requested = False

    def __init__(self) -> None:
        self.progress: list[tuple[float, float]] = []

    async def set_backend_ref(self, ref: str) -> None:
        self.backend_ref = ref

    def report_progress(self, value: float, maximum: float, **extra: Any) -> None:
        self.progress.append((value, maximum))

    def report_preview(self, data: bytes, mime_type: str) -> None:
        raise AssertionError("the mock sends no previews")


class CountingMock(MockBackend):
    calls = 0

    async def generate(self, request: Any, ctx: Any) -> Any:
        CountingMock.calls += 1
        return await super().generate(request, ctx)


def pipeline(tmp_path: Path, store: StorageSink) -> Pipeline:
    backend = CountingMock.from_config("mock", {"type": "mock"})
    return Pipeline({"mock": backend}, "mock", store, OutputConfig(directory=tmp_path))


SPEC = JobSpec(owner_user_id=OWNER, prompt="a heron", width=64, height=64, steps=3)


async def _upload_failed_once(tmp_path: Path, store: FlakyStore) -> uuid.UUID:
    """A job rendered once whose upload failed: its files and journal wait for the retry."""
    job_id = uuid.uuid4()
    CountingMock.calls = 0
    with pytest.raises(RetryableError):
        await pipeline(tmp_path, store).run(job_id, SPEC, CountingContext())
    return job_id


async def test_a_failed_upload_keeps_the_image_and_the_retry_uploads_the_same_file(tmp_path: Path) -> None:
    store = FlakyStore(outages=1)
    job_id = await _upload_failed_once(tmp_path, store)
    images = list(tmp_path.glob("*.png"))
    assert len(images) == 1, "the image is on disk although the upload failed"

    artifact = await pipeline(tmp_path, store).run(job_id, SPEC, CountingContext())
    assert artifact.reused and CountingMock.calls == 1, "the retry does not generate again"
    assert artifact.image_path == images[0]
    thumbnail = artifact.main.thumbnail_path
    assert artifact.main.thumbnail_key and thumbnail is not None
    assert store.objects == {
        artifact.storage_key: images[0].read_bytes(),
        artifact.main.thumbnail_key: thumbnail.read_bytes(),
    }
    assert hashlib.sha256(images[0].read_bytes()).hexdigest() == artifact.sha256


async def test_a_journal_whose_image_never_became_durable_is_not_reused(tmp_path: Path) -> None:
    # The journal is written while the image flushes; after a power cut it can name an image
    # whose bytes never reached the disk. The retry must render again, not upload those bytes.
    store = FlakyStore(outages=1)
    job_id = await _upload_failed_once(tmp_path, store)
    [image] = tmp_path.glob("*.png")
    image.write_bytes(image.read_bytes()[:20])  # what a lost flush leaves: a torn file

    artifact = await pipeline(tmp_path, store).run(job_id, SPEC, CountingContext())

    assert not artifact.reused and CountingMock.calls == 2, "rendered again"
    assert hashlib.sha256(artifact.image_path.read_bytes()).hexdigest() == artifact.sha256
    assert store.objects[artifact.storage_key] == artifact.image_path.read_bytes()


async def test_a_first_attempt_does_not_look_for_a_journal_and_forgetting_removes_it(tmp_path: Path) -> None:
    job_id = uuid.uuid4()
    CountingMock.calls = 0
    with pytest.raises(RetryableError):
        await pipeline(tmp_path, FlakyStore(outages=1)).run(job_id, SPEC, CountingContext())
    journal = tmp_path / ".imagen-journal" / f"{job_id}.json"
    assert journal.is_file()

    fresh = await pipeline(tmp_path, FlakyStore(0)).run(job_id, SPEC, CountingContext(), resume=False)
    assert not fresh.reused and CountingMock.calls == 2, "resume=False: no earlier attempt to reuse"

    forget(tmp_path, job_id).result(timeout=5)
    assert not journal.exists()


async def test_without_strict_upload_the_error_is_reported_not_raised(tmp_path: Path) -> None:
    artifact = await pipeline(tmp_path, FlakyStore(outages=1)).run(
        uuid.uuid4(), SPEC, CountingContext(), strict_upload=False
    )
    assert isinstance(artifact.upload_error, RetryableError)
    assert artifact.image_path.is_file() and artifact.sidecar_path and artifact.sidecar_path.is_file()


async def test_a_job_without_a_seed_gets_one_that_is_stable_across_retries(tmp_path: Path) -> None:
    job_id = uuid.uuid4()
    first = await pipeline(tmp_path, FlakyStore(0)).run(job_id, SPEC, CountingContext())
    forget(tmp_path, job_id)
    second = await pipeline(tmp_path / "again", FlakyStore(0)).run(job_id, SPEC, CountingContext())
    assert first.seed == second.seed == derived_seed(job_id)
    assert first.sha256 == second.sha256, "same prompt, seed and size: same mock image"


async def test_styles_wrap_the_prompt_and_progress_reaches_the_context(tmp_path: Path) -> None:
    ctx = CountingContext()
    spec = JobSpec(owner_user_id=OWNER, prompt="a heron", style="watercolor", width=64, height=64, steps=3)
    artifact = await pipeline(tmp_path, FlakyStore(0)).run(uuid.uuid4(), spec, ctx)
    assert artifact.sidecar["styled_prompt"].startswith("watercolor painting of a heron")
    assert ctx.progress == [(1, 3), (2, 3), (3, 3)]


async def test_an_unknown_backend_is_a_terminal_error_that_names_what_is_served_only_in_its_detail(
    tmp_path: Path,
) -> None:
    spec = JobSpec(owner_user_id=OWNER, prompt="x", backend="sdxl-box")
    with pytest.raises(TerminalError) as caught:
        await pipeline(tmp_path, FlakyStore(0)).run(uuid.uuid4(), spec, CountingContext())
    assert caught.value.message == "unknown backend 'sdxl-box': no worker serves it"
    assert caught.value.detail == {"backend": "sdxl-box", "served": ["mock"]}


@pytest.mark.parametrize("refused", ["the image's flush", "the thumbnail", "the journal"])
async def test_a_disk_that_refuses_the_files_fails_the_job_and_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refused: str
) -> None:
    def full_disk(*_: object) -> None:
        raise OSError(28, "No space left on device")

    if refused == "the image's flush":
        monkeypatch.setattr(os, "fsync", full_disk)  # on the image's own thread
    else:
        real_write_copy = output.write_copy
        journal = refused == "the journal"

        def write_copy(path: Path, data: bytes) -> None:
            if (path.parent.name == ".imagen-journal") == journal:
                full_disk()
            real_write_copy(path, data)

        monkeypatch.setattr(output, "write_copy", write_copy)
    job_id = uuid.uuid4()
    with pytest.raises(RetryableError) as caught:
        await pipeline(tmp_path, FlakyStore(0)).run(job_id, SPEC, CountingContext())

    assert caught.value.message == (
        "could not write the image to the output directory (No space left on device)"
    )
    # No journal names the files, so nothing else would ever remove them; and a retry must
    # not reuse an image that was never flushed.
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


async def test_discarding_a_failed_job_leaves_nothing_of_it_on_disk(tmp_path: Path) -> None:
    job_id, other = uuid.uuid4(), uuid.uuid4()
    with pytest.raises(RetryableError):
        await pipeline(tmp_path, FlakyStore(outages=1)).run(job_id, SPEC, CountingContext())
    kept = await pipeline(tmp_path, FlakyStore(0)).run(other, SPEC, CountingContext())
    assert any(tmp_path.rglob(f"{job_id}.json")), "the journal caches the failed upload's file"

    discard(tmp_path, job_id)

    left = {p for p in tmp_path.rglob("*") if p.is_file()}
    journal = tmp_path / ".imagen-journal" / f"{other}.json"
    assert left == {kept.image_path, kept.sidecar_path, kept.main.thumbnail_path, journal}


async def test_the_images_row_keeps_host_internals_apart_from_the_sidecar(tmp_path: Path) -> None:
    artifact = await pipeline(tmp_path, FlakyStore(0)).run(uuid.uuid4(), SPEC, CountingContext())
    [record] = artifact.image_records()
    assert "local_path" not in record.sidecar and "backend_metadata" not in record.sidecar
    assert record.internals["local_path"] == str(artifact.image_path)
    assert record.storage_path == f"{OWNER}/{artifact.sidecar['job_id']}.png"
    assert ImageRecord.from_result(record.as_result()) == record


class TinyMock(MockBackend):
    """Renders 8x8 whatever the request asks, the way a workflow with a fixed size does."""

    async def generate(self, request: Any, ctx: Any) -> Any:
        result = await super().generate(request, ctx)
        result.image = Output(data=render_png("tiny", 1, 8, 8), mime_type="application/octet-stream")
        return result


async def test_the_artifact_records_the_file_s_size_and_type_not_the_request_s(tmp_path: Path) -> None:
    backend = TinyMock.from_config("mock", {"type": "mock"})
    run = Pipeline({"mock": backend}, "mock", FlakyStore(0), OutputConfig(directory=tmp_path))

    artifact = await run.run(uuid.uuid4(), SPEC, CountingContext())

    assert (SPEC.width, SPEC.height) == (64, 64)
    assert (artifact.width, artifact.height, artifact.mime_type) == (8, 8, "image/png")
    assert artifact.image_path.suffix == artifact.storage_key[-4:] == ".png", "named by what it is"
    assert (artifact.sidecar["width"], artifact.sidecar["height"]) == (8, 8)
    assert artifact.sidecar["requested_size"] == [64, 64]


async def test_params_are_checked_before_the_backend_runs(tmp_path: Path) -> None:
    CountingMock.calls = 0
    spec = JobSpec(owner_user_id=OWNER, prompt="x", width=64, height=64, params={"width": 4096})

    with pytest.raises(TerminalError, match=r"^params.width is not allowed"):
        await pipeline(tmp_path, FlakyStore(0)).run(uuid.uuid4(), spec, CountingContext())
    assert CountingMock.calls == 0


async def test_a_batch_of_four_webp_is_four_files_four_thumbnails_and_four_uploads(tmp_path: Path) -> None:
    store = FlakyStore(0)
    job_id = uuid.uuid4()
    spec = JobSpec(owner_user_id=OWNER, prompt="a heron", width=64, height=48, n=4, format="webp", quality=60)
    artifact = await pipeline(tmp_path, store).run(job_id, spec, CountingContext())

    records = artifact.image_records()
    assert [r.index for r in records] == [0, 1, 2, 3]
    assert [r.storage_path for r in records] == [
        f"{OWNER}/{job_id}.webp",
        *(f"{OWNER}/{job_id}-{i}.webp" for i in (1, 2, 3)),
    ]
    assert [r.thumbnail_path for r in records] == [f"{OWNER}/{job_id}/{i}.thumb.webp" for i in range(4)]
    assert set(store.objects) == {r.storage_path for r in records} | {str(r.thumbnail_path) for r in records}
    assert all(r.mime_type == "image/webp" and (r.width, r.height) == (64, 48) for r in records)
    assert len({r.sha256 for r in records}) == 4
    assert [r.sidecar["index"] for r in records] == [0, 1, 2, 3]

    retried = await pipeline(tmp_path, store).run(job_id, spec, CountingContext())
    assert retried.reused and retried.image_records() == records, "the journal keeps the whole batch"
    discard(tmp_path, job_id)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()], "discard removes every file of the batch"


class DamagedSecondMock(MockBackend):
    """A batch whose second image arrives damaged (its pixel data's checksum fails)."""

    async def generate(self, request: Any, ctx: Any) -> Any:
        result = await super().generate(request, ctx)
        damaged = bytearray(result.extra_outputs[0].read())
        damaged[damaged.index(b"IDAT") + 6] ^= 0xFF
        result.extra_outputs[0] = Output(data=bytes(damaged), mime_type="image/png")
        return result


async def test_a_damaged_image_fails_the_attempt_in_words_and_leaves_no_file_of_the_job(
    tmp_path: Path,
) -> None:
    backend = DamagedSecondMock.from_config("mock", {"type": "mock"})
    run = Pipeline({"mock": backend}, "mock", FlakyStore(0), OutputConfig(directory=tmp_path, format="webp"))
    spec = JobSpec(owner_user_id=OWNER, prompt="a heron", width=64, height=64, n=2)

    with pytest.raises(RetryableError, match=r"^the backend's PNG image is damaged and cannot be read$"):
        await run.run(uuid.uuid4(), spec, CountingContext())

    assert not [p for p in tmp_path.rglob("*") if p.is_file()], "the first image's files went too"


async def test_n_over_max_batch_is_refused_before_the_backend_runs(tmp_path: Path) -> None:
    spec = JobSpec(owner_user_id=OWNER, prompt="a heron", width=64, height=64, n=5)
    CountingMock.calls = 0
    with pytest.raises(TerminalError, match=r"^n 5 is over backend \"mock\"'s limit of 4 images per job"):
        await pipeline(tmp_path, FlakyStore(0)).run(uuid.uuid4(), spec, CountingContext())
    assert CountingMock.calls == 0


def _jpeg_tables(quality: int) -> dict[int, list[int]]:
    """The quantization tables Pillow writes at ``quality``: how a JPEG shows its quality."""
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, format="JPEG", quality=quality)
    with Image.open(out) as image:
        return dict(image.quantization)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("job", "block", "section", "expected"),
    [
        ((None, None), {}, ("png", 90), ("PNG", None)),
        ((None, None), {"format": "jpeg", "quality": 40}, ("webp", 90), ("JPEG", 40)),
        ((None, None), {"format": "jpeg"}, ("png", 55), ("JPEG", 55)),
        ((None, None), {"quality": 30}, ("jpeg", 90), ("JPEG", 30)),
        (("jpeg", 70), {"format": "webp", "quality": 40}, ("png", 90), ("JPEG", 70)),
        (("jpeg", None), {"format": "webp", "quality": 40}, ("png", 90), ("JPEG", 40)),
    ],
    ids=["section", "block", "block-format-section-quality", "block-quality", "job", "job-format-block-q"],
)
async def test_format_and_quality_come_from_the_job_then_the_backend_block_then_the_output_section(
    tmp_path: Path,
    job: tuple[str | None, int | None],
    block: dict[str, Any],
    section: tuple[str, int],
    expected: tuple[str, int | None],
) -> None:
    backend = MockBackend.from_config("mock", {"type": "mock", **block})
    config = OutputConfig(directory=tmp_path, format=section[0], quality=section[1])  # type: ignore[arg-type]
    spec = JobSpec(owner_user_id=OWNER, prompt="a heron", width=64, height=48, format=job[0], quality=job[1])

    artifact = await Pipeline({"mock": backend}, "mock", FlakyStore(0), config).run(
        uuid.uuid4(), spec, CountingContext()
    )

    with Image.open(artifact.image_path) as image:
        assert image.format == expected[0]
        if expected[1] is not None:
            assert dict(image.quantization) == _jpeg_tables(expected[1])  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"format": "gif"}, "backend \"mock\": format: input should be 'png', 'webp' or 'jpeg' (got 'gif')"),
        ({"quality": 0}, 'backend "mock": quality: input should be greater than or equal to 1 (got 0)'),
    ],
)
def test_a_backend_block_with_a_bad_format_or_quality_is_refused_in_one_line(
    block: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        MockBackend.from_config("mock", {"type": "mock", **block})
    assert str(caught.value) == message


async def test_jobs_naming_the_same_file_at_the_same_moment_each_keep_their_own_files(tmp_path: Path) -> None:
    # Same prompt, seed and day: the same name under the default template. Different owners
    # and sizes, so any file one job wrote over the other's would show.
    line = pipeline(tmp_path, FlakyStore(0))
    owners = [uuid.UUID(int=n) for n in range(1, 9)]
    specs = [
        JobSpec(owner_user_id=o, prompt="a fox", seed=7, width=64 * (n + 1), height=64)
        for n, o in enumerate(owners)
    ]
    artifacts = await asyncio.gather(*(line.run(uuid.uuid4(), spec, CountingContext()) for spec in specs))

    pictures = [artifact.pictures[0] for artifact in artifacts]
    assert len({p.image_path for p in pictures}) == len({p.thumbnail_path for p in pictures}) == len(specs)
    for spec, picture in zip(specs, pictures, strict=True):
        assert hashlib.sha256(picture.image_path.read_bytes()).hexdigest() == picture.sha256
        assert picture.thumbnail_path is not None
        with Image.open(picture.image_path) as image, Image.open(picture.thumbnail_path) as thumb:
            assert image.width == spec.width and json.loads(image.info["imagen"])["prompt"] == "a fox"
            assert thumb.width / thumb.height == pytest.approx(spec.width / spec.height, rel=0.05)
        assert (
            json.loads(output.sidecar_path(picture.image_path).read_text())["requested_size"][0] == spec.width
        )


async def test_an_images_thumbnail_is_named_after_its_whole_name(tmp_path: Path) -> None:
    assert output.thumbnail_path(tmp_path / "fox-7.png") != output.thumbnail_path(tmp_path / "fox-7.webp")
    assert output.thumbnail_path(tmp_path / "fox-7.png").name == "fox-7.png.thumb.webp"


class WorkflowMock(MockBackend):
    """A backend that reports the graph it ran, as ComfyUI's adapter does."""

    async def generate(self, request: Any, ctx: Any) -> Any:
        result = await super().generate(request, ctx)
        return dataclasses.replace(
            result, metadata={**result.metadata, "workflow_graph": {"3": {"class_type": "X"}}}
        )


@pytest.mark.parametrize("embed_workflow", [True, False])
async def test_embed_workflow_decides_whether_the_graph_goes_into_the_image(
    tmp_path: Path, embed_workflow: bool
) -> None:
    backend = WorkflowMock.from_config("mock", {"type": "mock"})
    config = OutputConfig(directory=tmp_path, embed_workflow=embed_workflow)
    line = Pipeline({"mock": backend}, "mock", FlakyStore(0), config)

    artifact = await line.run(uuid.uuid4(), SPEC, CountingContext())

    with Image.open(artifact.pictures[0].image_path) as image:
        embedded = json.loads(image.info["imagen"])
    assert embedded["prompt"] == "a heron" and embedded["seed"] == artifact.pictures[0].sidecar["seed"]
    assert ("workflow" in embedded) is embed_workflow
