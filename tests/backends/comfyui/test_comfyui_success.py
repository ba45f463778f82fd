"""The happy path: one prompt in, our own PNG out, everything a job row needs recorded."""

from __future__ import annotations

import hashlib
import sys
import uuid

import pytest

from imagen_worker.backends.comfyui.pool import first_prompt_id, parse_ref
from tests.backends.comfyui.conftest import BackendFactory
from tests.backends.comfyui.support import RecordingContext, make_request
from tests.fakes.comfyui import FakeComfyUI

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


async def test_success_returns_the_png_and_records_where_it_came_from(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    backend = await make_backend(fake)
    ctx = RecordingContext(fake=fake)
    request = make_request()

    result = await backend.generate(request, ctx)

    assert result.image.read().startswith(PNG_MAGIC)
    assert result.image.mime_type == "image/png"
    assert result.extra_outputs == []
    assert result.model == "v1-5-pruned-emaonly.safetensors"
    meta = result.metadata
    assert meta["comfyui_version"] == "0.3.64"
    assert meta["instance"] == fake.url
    assert meta["outputs"][0]["node_type"] == "SaveImage"
    assert meta["outputs"][0]["sha256"] == hashlib.sha256(result.image.read()).hexdigest()
    assert meta["outputs"][0]["subfolder"] == f"imagen/{request.job_id}"


async def test_a_first_claim_posts_under_the_jobs_first_prompt_id_and_stores_no_ref(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    # No commit before the POST: a later attempt finds this prompt by the job id alone.
    backend = await make_backend(fake)
    ctx = RecordingContext(fake=fake)
    request = make_request()

    result = await backend.generate(request, ctx)

    assert ctx.refs == []
    post = fake.calls("POST", "/prompt")[0]
    assert post.body["prompt_id"] == result.metadata["prompt_id"] == first_prompt_id(request.job_id)
    assert str(uuid.UUID(post.body["prompt_id"])) == post.body["prompt_id"], "canonical, lowercase"
    assert post.body["client_id"] == result.metadata["client_id"]
    before_post = fake.requests[: fake.requests.index(post)]
    assert not [r for r in before_post if r.path.startswith("/history")], "nothing earlier to look for"


async def test_a_resubmission_stores_its_ref_before_the_post_naming_instance_and_prompt(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    backend = await make_backend(fake)
    ctx = RecordingContext(fake=fake, first_claim=False)
    request = make_request()

    result = await backend.generate(request, ctx)

    assert ctx.posts_before_ref == [0]
    assert parse_ref(ctx.refs[0]) == (result.metadata["prompt_id"], fake.url)
    assert result.metadata["prompt_id"] != first_prompt_id(request.job_id), "a fresh id"
    post = fake.calls("POST", "/prompt")[0]
    assert post.body["prompt_id"] == result.metadata["prompt_id"] == result.metadata["prompt_id"].lower()


async def test_request_fields_are_patched_into_the_graph_verbatim(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    backend = await make_backend(fake)
    tricky = 'a "quoted" {brace} prompt\\n with %s and ${x}'
    request = make_request(tricky, negative_prompt="blurry", width=640, height=384, steps=3, seed=123456789)

    await backend.generate(request, RecordingContext())

    graph = fake.calls("POST", "/prompt")[0].body["prompt"]
    assert graph["6"]["inputs"]["text"] == tricky
    assert graph["7"]["inputs"]["text"] == "blurry"
    assert graph["3"]["inputs"]["seed"] == 123456789
    assert graph["3"]["inputs"]["steps"] == 3
    assert (graph["5"]["inputs"]["width"], graph["5"]["inputs"]["height"]) == (640, 384)
    assert graph["9"]["inputs"]["filename_prefix"].startswith(f"imagen/{request.job_id}/")


async def test_health_reports_version_and_queue(fake: FakeComfyUI, make_backend: BackendFactory) -> None:
    backend = await make_backend(fake)

    health = await backend.health()

    assert health.ok
    assert health.info[fake.url]["comfyui_version"] == "0.3.64"
    assert health.info[fake.url]["queue_remaining"] == 0


class _MissingImports:
    """Last on ``sys.meta_path``: sees only the imports every other finder failed."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        self.names.append(name)


async def test_a_job_imports_nothing_that_is_missing(
    fake: FakeComfyUI, make_backend: BackendFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # httpcore imports sniffio on every request; were it not installed, each failed import would
    # search sys.path again: some forty microseconds, five times per request.
    backend = await make_backend(fake)
    await backend.generate(make_request(), RecordingContext(fake=fake))  # first-use imports
    missing = _MissingImports()
    monkeypatch.setattr(sys, "meta_path", [*sys.meta_path, missing])

    await backend.generate(make_request(), RecordingContext(fake=fake))

    assert missing.names == []
