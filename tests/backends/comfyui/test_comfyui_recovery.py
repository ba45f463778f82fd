"""A later attempt of a job (a retry, or a takeover after a crashed worker) finds its earlier prompt:
the one its backend ref names or, with no ref, the one its first claim submitted under the job's
first prompt id."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import httpx
import pytest

from imagen_worker.backends.comfyui.pool import first_prompt_id, make_ref
from imagen_worker.errors import BackendUnavailable
from tests.backends.comfyui.conftest import BackendFactory
from tests.backends.comfyui.support import RecordingContext, make_request
from tests.fakes.comfyui import FakeComfyUI

GRAPH = {
    "1": {
        "class_type": "EmptyImage",
        "inputs": {"width": 8, "height": 8, "batch_size": 2, "color": 0x123456},
    },
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "imagen/earlier/out"}},
}


async def _post_elsewhere(fake: FakeComfyUI, prompt_id: str, graph: dict[str, Any] = GRAPH) -> None:
    """Submit as a previous worker process would have: another client_id, our prompt id."""
    async with httpx.AsyncClient(base_url=fake.url) as http:
        answer = await http.post(
            "/prompt", json={"prompt": graph, "prompt_id": prompt_id, "client_id": "dead-worker"}
        )
        assert answer.status_code == 200


async def _finished_elsewhere(fake: FakeComfyUI) -> str:
    """A prompt an earlier worker process submitted, finished and in ComfyUI's history."""
    prompt_id = str(uuid.uuid4())
    await _post_elsewhere(fake, prompt_id)
    await fake.wait_until(lambda: fake.history_entry(prompt_id) is not None)
    return prompt_id


async def test_a_finished_prompt_is_collected_without_resubmitting(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    prompt_id = await _finished_elsewhere(fake)
    backend = await make_backend(fake)
    ctx = RecordingContext(backend_ref=make_ref(prompt_id, fake.url))

    result = await backend.generate(make_request(), ctx)

    assert len(fake.calls("POST", "/prompt")) == 1  # only the earlier one
    assert ctx.refs == []
    assert result.metadata["prompt_id"] == prompt_id
    assert [o["filename"] for o in result.metadata["outputs"]] == ["out_00001_.png", "out_00002_.png"]
    assert len(result.extra_outputs) == 1  # a batch of two: the first is the image, the rest ride along


async def test_a_prompt_still_running_is_waited_for(fake: FakeComfyUI, make_backend: BackendFactory) -> None:
    fake.default_duration = 0.3
    prompt_id = str(uuid.uuid4())
    await _post_elsewhere(fake, prompt_id)
    await fake.wait_running()
    backend = await make_backend(fake, poll_interval=0.05)

    result = await asyncio.wait_for(
        backend.generate(make_request(), RecordingContext(make_ref(prompt_id, fake.url))), 5
    )

    assert len(fake.calls("POST", "/prompt")) == 1
    assert result.metadata["prompt_id"] == prompt_id


async def test_an_unknown_prompt_is_submitted_again_under_a_new_ref(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    backend = await make_backend(fake)
    forgotten = str(uuid.uuid4())
    ctx = RecordingContext(backend_ref=make_ref(forgotten, fake.url), fake=fake)

    result = await backend.generate(make_request(), ctx)

    assert fake.calls("GET", "/history/")[0].path == f"/history/{forgotten}"
    assert len(fake.calls("POST", "/prompt")) == 1
    assert result.metadata["prompt_id"] != forgotten
    assert ctx.refs == [make_ref(result.metadata["prompt_id"], fake.url)]
    assert ctx.posts_before_ref == [0]


async def test_a_ref_for_an_instance_no_longer_configured_is_resubmitted(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    backend = await make_backend(fake)
    ctx = RecordingContext(backend_ref=make_ref(str(uuid.uuid4()), "http://retired-gpu:8188"))

    result = await backend.generate(make_request(), ctx)

    assert ctx.refs == [make_ref(result.metadata["prompt_id"], fake.url)]


async def test_with_no_ref_the_first_prompt_is_found_on_whichever_instance_has_it(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    request = make_request()
    async with FakeComfyUI() as other:
        await _post_elsewhere(other, first_prompt_id(request.job_id))
        await other.wait_until(lambda: other.history_entry(first_prompt_id(request.job_id)) is not None)
        backend = await make_backend([fake.url, other.url])
        ctx = RecordingContext(first_claim=False)

        result = await backend.generate(request, ctx)

        assert fake.calls("POST", "/prompt") == [] and len(other.calls("POST", "/prompt")) == 1
    assert ctx.refs == []
    assert result.metadata["prompt_id"] == first_prompt_id(request.job_id)
    assert result.metadata["instance"] == other.url


async def test_with_no_ref_a_first_prompt_still_running_is_waited_for(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    fake.default_duration = 0.3
    request = make_request()
    await _post_elsewhere(fake, first_prompt_id(request.job_id))
    await fake.wait_running()
    backend = await make_backend(fake, poll_interval=0.05)

    result = await asyncio.wait_for(backend.generate(request, RecordingContext(first_claim=False)), 5)

    assert len(fake.calls("POST", "/prompt")) == 1
    assert result.metadata["prompt_id"] == first_prompt_id(request.job_id)


async def test_with_no_ref_a_failed_first_prompt_is_submitted_again_under_a_new_recorded_id(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    request = make_request()
    first = first_prompt_id(request.job_id)
    failing = json.loads(json.dumps(GRAPH))
    failing["2"]["inputs"]["filename_prefix"] = "x[fake:error]"
    await _post_elsewhere(fake, first, failing)
    await fake.wait_until(lambda: fake.history_entry(first) is not None)
    backend = await make_backend(fake)
    ctx = RecordingContext(first_claim=False, fake=fake)

    result = await backend.generate(request, ctx)

    # A second prompt under the first id would overwrite the first one's history.
    assert result.metadata["prompt_id"] != first
    assert ctx.refs == [make_ref(result.metadata["prompt_id"], fake.url)]
    assert ctx.posts_before_ref == [1], "recorded before its POST (the one before is the failed first)"


async def test_after_an_operators_retry_even_a_finished_first_prompt_is_rendered_again(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    # The retry resets the ref to a note that names no submission (imagen_worker/queries.sql,
    # retry_job): the operator asked for a new render, not for the old one's files again.
    request = make_request()
    first = first_prompt_id(request.job_id)
    await _post_elsewhere(fake, first)
    await fake.wait_until(lambda: fake.history_entry(first) is not None)
    backend = await make_backend(fake)
    ctx = RecordingContext(backend_ref="retried by an operator", first_claim=False, fake=fake)

    result = await backend.generate(request, ctx)

    assert result.metadata["prompt_id"] != first
    assert len(fake.calls("POST", "/prompt")) == 2
    assert ctx.refs == [make_ref(result.metadata["prompt_id"], fake.url)]


async def test_a_finished_prompt_whose_outputs_are_gone_is_rendered_again(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    # ComfyUI keeps a prompt's history in memory and its files on disk: an operator clearing
    # the output folder leaves a history whose files answer 404, and adopting it again at
    # every retry would fail the job once its attempts ran out.
    earlier = await _finished_elsewhere(fake)
    fake.files = {key: data for key, data in fake.files.items() if key[0] != "output"}
    backend = await make_backend(fake)
    ctx = RecordingContext(backend_ref=make_ref(earlier, fake.url), fake=fake)

    result = await backend.generate(make_request(), ctx)

    asked_first = fake.calls("GET", "/view")[0]
    assert asked_first.query["filename"] == "out_00001_.png", "the earlier prompt's outputs"
    assert len(fake.calls("POST", "/prompt")) == 2
    assert result.metadata["prompt_id"] != earlier
    assert ctx.refs == [make_ref(result.metadata["prompt_id"], fake.url)]


async def test_an_instance_that_drops_out_while_an_earlier_prompt_is_collected_is_an_outage(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    earlier = await _finished_elsewhere(fake)
    fake.fail_next["/view"] = [502]
    backend = await make_backend(fake)
    ctx = RecordingContext(backend_ref=make_ref(earlier, fake.url), fake=fake)

    with pytest.raises(BackendUnavailable):
        await backend.generate(make_request(), ctx)

    assert len(fake.calls("POST", "/prompt")) == 1, "not rendered again: the next attempt adopts it"
    assert ctx.refs == []
