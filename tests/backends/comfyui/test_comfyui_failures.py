"""How each ComfyUI failure reaches the job: the sentence, the detail, retryable or not."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from imagen_worker.backends.comfyui.failures import UNAVAILABLE
from imagen_worker.errors import BackendUnavailable, RetryableError, TerminalError
from tests.backends.comfyui.conftest import BackendFactory
from tests.backends.comfyui.support import RecordingContext, make_request
from tests.fakes.comfyui import FakeComfyUI

# Answers recorded from a real ComfyUI 0.3.64.
TRANSCRIPTS = Path(__file__).parents[2] / "fakes" / "comfyui_recorded.json"


async def test_a_missing_checkpoint_is_a_terminal_readable_rejection(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    backend = await make_backend(fake, checkpoint="not-installed.safetensors")

    with pytest.raises(TerminalError) as caught:
        await backend.generate(make_request(), RecordingContext())

    message = caught.value.message
    assert message.startswith(
        "ComfyUI rejected the workflow: node 4 (CheckpointLoaderSimple) input ckpt_name: value not in list: "
        "'not-installed.safetensors' not in ["
    )
    assert caught.value.detail["node_errors"]["4"]["errors"][0]["type"] == "value_not_in_list"
    assert caught.value.detail["comfyui_error"]["type"] == "prompt_outputs_failed_validation"
    assert fake.executions == []


async def test_out_of_range_values_name_node_input_and_value(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    backend = await make_backend(fake)

    with pytest.raises(TerminalError) as caught:
        await backend.generate(make_request(width=8), RecordingContext())

    assert "node 5 (EmptyLatentImage) input width: value 8 smaller than min of 16" in caught.value.message


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        (
            "unknown_class_type",
            "ComfyUI rejected the workflow: Cannot execute because node NoSuchNode does not exist",
        ),
        ("link_type_mismatch", "node 2 (SaveImage) input images: return type mismatch between linked nodes"),
        (
            "bad_combo_value",
            "node 1 (LoadImage) input image: custom validation failed for node: image - Invalid",
        ),
    ],
)
def test_recorded_400_bodies_become_sentences(case: str, expected: str) -> None:
    from imagen_worker.backends.comfyui.failures import rejection

    recorded = json.loads(TRANSCRIPTS.read_text())["post_prompt_errors"]["http"]
    body = next(entry["response"] for entry in recorded if entry.get("case") == case)

    error = rejection(body)

    assert expected in error.message
    assert error.detail["node_errors"] == body["node_errors"]


async def test_200_with_node_errors_fails_and_takes_the_prompt_back(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    partial = json.loads(TRANSCRIPTS.read_text())["partial_valid_200"]["http"][0]["body"]["prompt"]
    backend = await make_backend(fake)
    fake.pause()

    with pytest.raises(TerminalError) as caught:
        await backend.generate(make_request(workflow={"graph": partial}), RecordingContext())

    assert caught.value.message.startswith(
        "ComfyUI accepted the workflow but dropped outputs that failed validation: node 6 (EmptyImage) "
        "input color: value 99999999999 bigger than max of 16777215"
    )
    prompt_id = fake.calls("POST", "/prompt")[0].body["prompt_id"]
    assert [r.body for r in fake.calls("POST", "/queue")] == [{"delete": [prompt_id]}]
    assert fake.pending_prompts == []
    assert fake.interrupts == []


async def test_a_failed_prompt_is_forgotten_so_comfyuis_history_does_not_grow(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    backend = await make_backend(fake)

    with pytest.raises(TerminalError):
        await backend.generate(make_request("a cat [fake:error=tile size must be even]"), RecordingContext())

    (prompt_id,) = [call.body["prompt_id"] for call in fake.calls("POST", "/prompt")]
    await fake.wait_until(lambda: fake.history_entry(prompt_id) is None)
    assert [call.body for call in fake.calls("POST", "/history")] == [{"delete": [prompt_id]}]


async def test_an_execution_error_names_node_exception_and_is_terminal(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    backend = await make_backend(fake)

    with pytest.raises(TerminalError) as caught:
        await backend.generate(make_request("a cat [fake:error=tile size must be even]"), RecordingContext())

    assert caught.value.message == "ComfyUI failed in node 9 (SaveImage): Exception: tile size must be even"
    detail: dict[str, Any] = caught.value.detail
    assert (detail["node_id"], detail["node_type"], detail["exception_type"]) == (
        "9",
        "SaveImage",
        "Exception",
    )
    clipped = detail["current_inputs"]["images"][0]
    assert clipped.endswith("more chars]") and len(clipped) < 300
    assert detail["traceback"]


async def test_out_of_memory_is_retryable(fake: FakeComfyUI, make_backend: BackendFactory) -> None:
    backend = await make_backend(fake)

    with pytest.raises(RetryableError) as caught:
        await backend.generate(make_request("a cat [fake:oom]"), RecordingContext())

    assert caught.value.message.startswith("ComfyUI failed in node 3 (KSampler): torch.OutOfMemoryError: ")
    assert "out of GPU memory" in caught.value.message


async def test_a_500_answer_is_retryable(fake: FakeComfyUI, make_backend: BackendFactory) -> None:
    backend = await make_backend(fake)
    fake.fail_next["/prompt"] = [500]

    with pytest.raises(RetryableError) as caught:
        await backend.generate(make_request(), RecordingContext())

    assert not isinstance(caught.value, BackendUnavailable)  # it may be this job's graph: spend an attempt
    assert caught.value.message == f"ComfyUI at {fake.url} answered 500 to POST /prompt"


async def test_a_gateway_error_is_an_outage_not_the_jobs_fault(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    backend = await make_backend(fake)
    fake.fail_next["/prompt"] = [502]

    with pytest.raises(BackendUnavailable) as caught:
        await backend.generate(make_request(), RecordingContext())

    assert caught.value.message == (
        "ComfyUI answered 502 to POST /prompt (it, or a proxy in front of it, is down); "
        "the job waits until it answers again"
    )
    assert caught.value.detail["instance"] == fake.url


async def test_an_unreachable_instance_makes_the_backend_unavailable(make_backend: BackendFactory) -> None:
    backend = await make_backend(["http://127.0.0.1:9"], connect_timeout=0.2)
    ctx = RecordingContext()

    with pytest.raises(BackendUnavailable) as caught:
        await backend.generate(make_request(), ctx)

    assert caught.value.message == (
        "ComfyUI is unreachable (no instance answers); the job waits until it answers again"
    )
    assert caught.value.detail["instance"] == "http://127.0.0.1:9"
    assert ctx.refs == []
    assert (backend.capacity, backend.unavailable_reason) == (0, UNAVAILABLE)
    health = await backend.health()
    assert not health.ok and "unreachable" in health.detail


async def test_a_workflow_without_image_output_is_terminal(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    graph = {
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "2": {"class_type": "SaveLatent", "inputs": {"samples": ["1", 0], "filename_prefix": "latents/x"}},
    }
    backend = await make_backend(fake)

    with pytest.raises(TerminalError) as caught:
        await backend.generate(make_request(workflow={"graph": graph}), RecordingContext())

    assert "saved no image" in caught.value.message
