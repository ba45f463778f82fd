"""Typed params: what a job may ask of each adapter, and the sentence it gets when it may not."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path
from typing import Any

import pytest

from imagen_worker.backends import create
from imagen_worker.backends.base import ROW_FIELDS, GenerateRequest
from imagen_worker.backends.comfyui import ComfyUIBackend
from imagen_worker.config import OutputConfig
from imagen_worker.errors import TerminalError
from imagen_worker.pipeline import Pipeline
from imagen_worker.queue.jobs import JobSpec
from imagen_worker.storage.local import LocalSink
from tests.fakes.comfyui import FakeComfyUI

OWNER = uuid.UUID("00000000-0000-4000-8000-0000000000aa")
COMFY: dict[str, Any] = {"type": "comfyui", "base_url": "http://127.0.0.1:9", "workflow": "sdxl"}


def request(width: int = 512, height: int = 512, steps: int | None = 20, **params: Any) -> GenerateRequest:
    return GenerateRequest(
        job_id=uuid.uuid4(), prompt="a kite", negative_prompt=None, width=width, height=height,
        steps=steps, seed=3, params=params, owner_user_id=OWNER,
    )  # fmt: skip


def refusal(block: dict[str, Any], req: GenerateRequest) -> str:
    with pytest.raises(TerminalError) as caught:
        create("gpu", block).check_request(req)
    return caught.value.message


@pytest.mark.parametrize("block", [{"type": "mock"}, COMFY], ids=["mock", "comfyui"])
@pytest.mark.parametrize("key", ROW_FIELDS)
def test_params_can_never_set_what_the_row_has_a_column_for(block: dict[str, Any], key: str) -> None:
    assert refusal(block, dataclasses.replace(request(), params={key: 2048})) == (
        f"params.{key} is not allowed: the job's own {key} column sets it"
    )


@pytest.mark.parametrize(
    ("block", "params", "sentence"),
    [
        ({"type": "mock"}, {"cfg_scale": 7}, "params.cfg_scale: unknown key (accepted: mock_fail)"),
        ({"type": "mock"}, {"mock_fail": "sometimes"}, "params.mock_fail: input should be 'terminal' or"),
        (COMFY, {"lora": "x"}, "params.lora: unknown key (accepted: batch_size, cfg, sampler, scheduler)"),
        (COMFY, {"cfg": 31}, "params.cfg: input should be less than or equal to 30 (got 31)"),
        (COMFY, {"cfg": "7"}, "params.cfg: input should be a valid number (got '7')"),
        (COMFY, {"cfg": True}, "params.cfg: input should be a valid number (got True)"),
        (COMFY, {"sampler": "evil_sampler"}, "params.sampler: not one of the allowed values (euler, "),
        (COMFY, {"scheduler": ["karras"]}, "params.scheduler: input should be a valid string"),
        (
            COMFY,
            {"checkpoint": "leaked-internal.safetensors"},
            'params.checkpoint is not allowed: backend "gpu" lists no checkpoint a job may choose',
        ),
        (
            {**COMFY, "checkpoints": ["a.safetensors"]},
            {"checkpoint": "b.safetensors"},
            "params.checkpoint: not",
        ),
    ],
)
def test_a_refused_param_is_one_sentence_naming_the_key(
    block: dict[str, Any], params: dict[str, Any], sentence: str
) -> None:
    message = refusal(block, request(**params))

    assert sentence in message
    assert "\n" not in message


def test_accepted_params_are_typed_and_only_what_was_sent() -> None:
    backend = create("gpu", {**COMFY, "checkpoints": ["juggernaut.safetensors"], "schedulers": ["karras"]})

    checked = backend.check_request(request(cfg=4, sampler="euler", checkpoint="juggernaut.safetensors"))

    assert checked.params == {"cfg": 4, "sampler": "euler", "checkpoint": "juggernaut.safetensors"}
    assert isinstance(backend, ComfyUIBackend)
    graph = backend.config.workflow.render(checked, "imagen/x")
    assert graph["4"]["inputs"]["ckpt_name"] == "juggernaut.safetensors"
    assert (graph["3"]["inputs"]["cfg"], graph["3"]["inputs"]["sampler_name"]) == (4, "euler")
    assert "scheduler" in refusal(backend_block(schedulers=["karras"]), request(scheduler="normal"))


def backend_block(**changes: Any) -> dict[str, Any]:
    return {**COMFY, **changes}


@pytest.mark.parametrize(
    ("block", "req", "sentence"),
    [
        (
            {"type": "mock"},
            request(width=4096, height=4096),
            'the image size 4096x4096 is over backend "gpu"\'s limit of 4194304 pixels (max_pixels)',
        ),
        (
            backend_block(max_pixels=512 * 512),
            request(width=1024, height=512),
            "limit of 262144 pixels (max_pixels)",
        ),
        (backend_block(max_steps=30), request(steps=31), 'steps 31 is over backend "gpu"\'s limit of 30'),
        (
            backend_block(max_batch=2),
            request(batch_size=3),
            'params.batch_size 3 is over backend "gpu"\'s limit of 2 (max_batch)',
        ),
    ],
)
def test_per_backend_limits_are_checked_against_the_row(
    block: dict[str, Any], req: GenerateRequest, sentence: str
) -> None:
    assert sentence in refusal(block, req)


def test_a_custom_binding_takes_the_type_the_operator_declares(tmp_path: Path) -> None:
    block = backend_block(
        bindings={"guidance": "3.cfg", "look": "3.scheduler"},
        params={"guidance": {"type": "float", "min": 1, "max": 5}, "look": {"choices": ["karras", "simple"]}},
    )
    backend = create("gpu", block)

    assert backend.check_request(request(guidance=2.5, look="simple")).params == {
        "guidance": 2.5,
        "look": "simple",
    }
    assert "params.guidance: input should be less than or equal to 5" in refusal(block, request(guidance=9))
    assert "params.look: not one of the allowed values (karras, simple)" in refusal(block, request(look="x"))


async def test_the_reported_exploit_fails_before_anything_reaches_comfyui(
    fake_comfyui: FakeComfyUI, tmp_path: Path
) -> None:
    """A 64x64 row with params asking for 2048x2048, a forbidden checkpoint and 500 steps."""
    backend = create("gpu", {**COMFY, "base_url": fake_comfyui.url})
    sink = LocalSink(tmp_path, output_directory=tmp_path)
    pipeline = Pipeline({"gpu": backend}, "gpu", sink, OutputConfig(directory=tmp_path))
    try:
        for params in ({"width": 2048, "height": 2048}, {"checkpoint": "secret.safetensors"}, {"steps": 500}):
            spec = JobSpec(owner_user_id=OWNER, prompt="p", width=64, height=64, params=params)
            with pytest.raises(TerminalError) as caught:
                await pipeline.run(uuid.uuid4(), spec, None)  # type: ignore[arg-type]
            assert caught.value.message.startswith(f"params.{next(iter(params))} is not allowed")
    finally:
        await backend.aclose()

    assert fake_comfyui.calls("POST", "/prompt") == []
