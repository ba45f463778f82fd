"""Input images in the ComfyUI adapter: typed params, one upload folder per job, bound by name."""

from __future__ import annotations

import dataclasses
import io
import json
import uuid
from pathlib import Path

import pytest
from PIL import Image

from imagen_worker.backends.base import GenerateRequest
from imagen_worker.errors import ConfigError, TerminalError
from imagen_worker.inputs import sniff
from tests.backends.comfyui.conftest import BackendFactory
from tests.backends.comfyui.support import RecordingContext, make_request
from tests.fakes.comfyui import FakeComfyUI

OWNER = uuid.UUID("11111111-2222-3333-4444-555555555555")


def png(width: int, height: int, rgb: tuple[int, int, int] = (200, 40, 10)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), rgb).save(out, "PNG")
    return out.getvalue()


def with_images(request: GenerateRequest, **images: bytes) -> GenerateRequest:
    """The request as the pipeline hands it over: params named, bytes fetched and checked."""
    keys = {name: f"{OWNER}/uploads/{name}.png" for name in images}
    fetched = {name: sniff(name, keys[name], data, 2048 * 2048, "gpu") for name, data in images.items()}
    params = {**request.params, "images": keys}
    return dataclasses.replace(request, owner_user_id=OWNER, params=params, inputs=fetched)


def invert_workflow(tmp_path: Path) -> str:
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}, "_meta": {"title": "Photo"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
        "4": {"class_type": "PrimitiveString", "inputs": {"value": ""}},
        "5": {"class_type": "PrimitiveInt", "inputs": {"value": 0}},
    }
    path = tmp_path / "invert.json"
    path.write_text(json.dumps(graph))
    return str(path)


async def test_img2img_uploads_the_image_into_the_jobs_own_folder_and_binds_its_name(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    backend = await make_backend(fake, workflow="sd15-img2img")
    request = with_images(make_request(params={"denoise": 0.4}), init=png(64, 48))
    request = dataclasses.replace(backend.check_request(request), inputs=request.inputs)

    result = await backend.generate(request, RecordingContext())

    upload = fake.calls("POST", "/upload/image")
    assert len(upload) == 1
    assert fake.files[("input", f"imagen/{request.job_id}", "init.png")] == request.inputs["init"].data
    graph = fake.calls("POST", "/prompt")[0].body["prompt"]
    assert graph["10"]["inputs"]["image"] == f"imagen/{request.job_id}/init.png"
    assert graph["3"]["inputs"]["denoise"] == 0.4
    assert (graph["5"]["inputs"]["width"], graph["5"]["inputs"]["height"]) == (512, 512)
    assert result.image.mime_type == "image/png"


async def test_inpaint_uploads_image_and_mask_and_scales_both_to_the_job_size(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    backend = await make_backend(fake, workflow="sdxl-inpaint")
    request = with_images(make_request(width=768, height=512), init=png(80, 60), mask=png(80, 60, (255,) * 3))
    request = dataclasses.replace(backend.check_request(request), inputs=request.inputs)

    await backend.generate(request, RecordingContext())

    graph = fake.calls("POST", "/prompt")[0].body["prompt"]
    assert graph["10"]["inputs"]["image"] == f"imagen/{request.job_id}/init.png"
    assert graph["13"]["inputs"]["image"] == f"imagen/{request.job_id}/mask.png"
    assert graph["13"]["class_type"] == "LoadImageMask"
    assert [graph[n]["inputs"]["width"] for n in ("5", "15")] == [768, 768]
    assert graph["3"]["inputs"]["denoise"] == 1.0  # the template's default


async def test_a_loaded_image_runs_through_the_workflow_at_its_own_size(
    fake: FakeComfyUI, make_backend: BackendFactory, tmp_path: Path
) -> None:
    backend = await make_backend(
        fake,
        workflow=invert_workflow(tmp_path),
        bindings={"prompt": "4.value", "seed": "5.value", "image.photo": "Photo.image"},
    )
    request = with_images(make_request(), photo=png(40, 30, (200, 120, 40)))
    request = dataclasses.replace(backend.check_request(request), inputs=request.inputs)

    result = await backend.generate(request, RecordingContext())

    with Image.open(io.BytesIO(result.image.read())) as saved:
        assert saved.size == (40, 30)
        assert saved.convert("RGB").getpixel((0, 0)) == (54, 135, 215)  # ComfyUI's float32 rounding


async def test_two_jobs_with_the_same_input_name_never_share_a_file(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    backend = await make_backend(fake, workflow="sd15-img2img")
    first = with_images(make_request(), init=png(16, 16, (1, 2, 3)))
    second = with_images(make_request(), init=png(16, 16, (4, 5, 6)))

    for request in (first, second):
        checked = dataclasses.replace(backend.check_request(request), inputs=request.inputs)
        await backend.generate(checked, RecordingContext())

    for request in (first, second):
        stored = fake.files[("input", f"imagen/{request.job_id}", "init.png")]
        assert stored == request.inputs["init"].data
    uploads = [call.body for call in fake.calls("POST", "/upload/image")]
    assert [f"imagen/{r.job_id}" in body for r, body in zip((first, second), uploads, strict=True)] == [
        True
    ] * 2
    assert all('name="overwrite"\r\n\r\ntrue' in body for body in uploads)


async def test_a_retry_overwrites_its_own_upload_instead_of_renaming_it(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    backend = await make_backend(fake, workflow="sd15-img2img")
    request = with_images(make_request(), init=png(16, 16, (1, 2, 3)))
    checked = dataclasses.replace(backend.check_request(request), inputs=request.inputs)
    await backend.generate(checked, RecordingContext())
    changed = with_images(dataclasses.replace(request, job_id=request.job_id), init=png(16, 16, (9, 9, 9)))

    await backend.generate(dataclasses.replace(checked, inputs=changed.inputs), RecordingContext())

    names = [
        graph["10"]["inputs"]["image"] for graph in (c.body["prompt"] for c in fake.calls("POST", "/prompt"))
    ]
    assert names == [f"imagen/{request.job_id}/init.png"] * 2
    assert fake.files[("input", f"imagen/{request.job_id}", "init.png")] == changed.inputs["init"].data


@pytest.mark.parametrize(
    ("images", "expected"),
    [
        ({"init": "00000000-0000-0000-0000-000000000000/uploads/cat.png"}, "not in the job owner's own"),
        ({"init": f"{OWNER}/uploads/../../other/cat.png"}, "'..' path segment"),
        ({"init": "https://example.com/cat.png"}, "never URLs"),
        ({"init": f"{OWNER}"}, "not in the job owner's own"),
        ({}, "params.images.init: field required"),
        ({"init": f"{OWNER}/a.png", "extra": f"{OWNER}/b.png"}, "params.images.extra: unknown key"),
    ],
)
async def test_input_image_keys_are_checked_before_anything_reaches_comfyui(
    fake: FakeComfyUI, make_backend: BackendFactory, images: dict[str, str], expected: str
) -> None:
    backend = await make_backend(fake, workflow="sd15-img2img")
    request = make_request(owner_user_id=OWNER, params={"images": images})

    with pytest.raises(TerminalError) as caught:
        backend.check_request(request)

    assert expected in caught.value.message
    assert caught.value.message.startswith('backend "gpu" refused the job\'s params: params.images')
    assert fake.calls("POST", "/upload/image") == []


async def test_a_workflow_that_binds_no_image_refuses_images(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    backend = await make_backend(fake, workflow="sd15")
    request = make_request(owner_user_id=OWNER, params={"images": {"init": f"{OWNER}/uploads/a.png"}})

    with pytest.raises(TerminalError, match=r"params\.images: unknown key"):
        backend.check_request(request)


async def test_an_input_image_name_must_be_plain(fake: FakeComfyUI, make_backend: BackendFactory) -> None:
    with pytest.raises(ConfigError, match=r"bindings\.image\.Init Photo: an input image's name is"):
        await make_backend(fake, workflow="sd15-img2img", bindings={"image.Init Photo": "10.image"})


async def test_health_does_not_ask_for_the_placeholder_an_upload_replaces(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    del fake.files[("input", "", "example.png")]  # an install whose input folder was emptied
    backend = await make_backend(fake, workflow="sd15-inpaint", checkpoint="v1-5-pruned-emaonly.safetensors")

    health = await backend.health()

    assert health.ok, health.detail
