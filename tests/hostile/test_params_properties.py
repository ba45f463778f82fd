"""Hostile params, for every adapter: whatever a web user puts in ``params``, the adapter's
params model either accepts it (and only what it declares reaches ``generate``) or the job
fails with one sentence that names the offending key. Nothing crashes, nothing unchecked
reaches a backend."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagen_worker.backends import create
from imagen_worker.backends.base import ROW_FIELDS, Backend, GenerateRequest, GenerateResult, shown_key
from imagen_worker.backends.comfyui import ComfyUIBackend
from imagen_worker.backends.mock import MockBackend
from imagen_worker.config import OutputConfig
from imagen_worker.errors import TerminalError
from imagen_worker.pipeline import Pipeline
from imagen_worker.queue.jobs import JobSpec
from imagen_worker.storage.local import LocalSink

OWNER = uuid.UUID("00000000-0000-4000-8000-00000000beef")

# Every adapter, configured the way an operator might: the ComfyUI one with allowlists.
BLOCKS: dict[str, dict[str, Any]] = {
    "mock": {"type": "mock"},
    "comfyui": {
        "type": "comfyui",
        "base_url": "http://127.0.0.1:9",
        "workflow": "sdxl",
        "checkpoints": ["sd_xl_base_1.0.safetensors", "juggernaut.safetensors"],
        "samplers": ["euler", "dpmpp_2m"],
        "max_batch": 2,
    },
    "comfyui-declared": {
        "type": "comfyui",
        "base_url": "http://127.0.0.1:9",
        "workflow": "sd15",
        "bindings": {"guidance": "3.cfg", "look": "3.scheduler", "lora_strength": "3.denoise"},
        "params": {"guidance": {"type": "float", "min": 1, "max": 5}, "look": {"choices": ["karras", 2]}},
    },
}
KNOWN_KEYS = [
    *ROW_FIELDS, "mock_fail", "cfg", "sampler", "scheduler", "checkpoint", "lora", "lora_strength",
    "denoise", "batch_size", "workflow", "bindings", "guidance", "look", "__class__", "", "cfg.x",
    "checkpoint\x00",
]  # fmt: skip
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(
        ["euler", "dpmpp_2m", "karras", "terminal", "retryable", "sd_xl_base_1.0.safetensors", 2, 3.5]
    ),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
params_dicts = st.dictionaries(
    st.one_of(st.sampled_from(KNOWN_KEYS), st.text(max_size=12)), json_values, max_size=5
)


def _backend(kind: str) -> Backend:
    return create(kind, BLOCKS[kind])


def _request(params: dict[str, Any]) -> GenerateRequest:
    return GenerateRequest(
        job_id=uuid.uuid4(), prompt="p", negative_prompt=None, width=512, height=512, steps=20, seed=1,
        params=params, owner_user_id=OWNER,
    )  # fmt: skip


def _assert_one_sentence_naming_a_key(error: TerminalError, params: dict[str, Any]) -> None:
    message = error.message
    assert "\n" not in message and "Traceback" not in message
    assert len(message) < 600, message
    assert any(f"params.{shown_key(key)}" in message for key in params), message


@pytest.mark.parametrize("kind", sorted(BLOCKS))
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(params=params_dicts)
def test_random_params_are_accepted_as_declared_or_refused_naming_the_key(
    kind: str, params: dict[str, Any]
) -> None:
    backend = _backend(kind)
    try:
        checked = backend.check_request(_request(params))
    except TerminalError as error:
        _assert_one_sentence_naming_a_key(error, params)
        return
    model = backend.params_model if kind == "mock" else backend.config.params  # type: ignore[attr-defined]
    assert set(checked.params) <= set(model.model_fields)
    assert set(checked.params) == set(params), "nothing is dropped silently"
    assert not set(checked.params) & set(ROW_FIELDS)
    assert backend.check_request(checked).params == checked.params, "validation is idempotent"


class Spy:
    """Records what reached ``generate`` and stops there (no network, no files)."""

    def __init__(self) -> None:
        self.seen: list[GenerateRequest] = []

    async def generate(self, request: GenerateRequest, ctx: Any) -> GenerateResult:
        self.seen.append(request)
        raise TerminalError("spy: stop here")


class _Ctx:
    backend_ref = None
    first_claim = True
    cancel_requested = False

    async def set_backend_ref(self, ref: str) -> None:
        raise AssertionError("nothing may be submitted")

    def report_progress(self, value: float, maximum: float, **extra: Any) -> None:
        return None

    def report_preview(self, data: bytes, mime_type: str) -> None:
        return None


@pytest.mark.parametrize("kind", sorted(BLOCKS))
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(params=params_dicts)
async def test_nothing_unvalidated_reaches_the_backend_through_the_pipeline(
    kind: str, params: dict[str, Any], tmp_path: Path
) -> None:
    backend = _backend(kind)
    spy = Spy()
    backend.generate = spy.generate  # type: ignore[method-assign]
    pipeline = Pipeline(
        {kind: backend},
        kind,
        LocalSink(tmp_path, output_directory=tmp_path),
        OutputConfig(directory=tmp_path),
    )
    spec = JobSpec(owner_user_id=OWNER, prompt="p", width=512, height=512, steps=20, params=params)

    with pytest.raises(TerminalError) as caught:
        await pipeline.run(uuid.uuid4(), spec, _Ctx())

    if caught.value.message == "spy: stop here":
        (seen,) = spy.seen
        assert seen == backend.check_request(seen), "what reached generate is what validation returns"
        assert dict(seen.params) == params
    else:
        assert spy.seen == []
        _assert_one_sentence_naming_a_key(caught.value, params)


VALID: dict[str, dict[str, Any]] = {
    "mock": {"mock_fail": "retryable"},
    "comfyui": {"cfg": 3, "sampler": "dpmpp_2m", "checkpoint": "juggernaut.safetensors", "batch_size": 2},
    "comfyui-declared": {"guidance": 1.5, "look": 2, "lora_strength": -0.5, "scheduler": "karras"},
}


@pytest.mark.parametrize("kind", sorted(BLOCKS))
def test_params_within_the_model_pass_unchanged(kind: str) -> None:
    assert dict(_backend(kind).check_request(_request(VALID[kind])).params) == VALID[kind]


def test_the_comfyui_model_is_what_the_docs_list() -> None:
    backend = _backend("comfyui")
    assert isinstance(backend, ComfyUIBackend)
    assert sorted(backend.config.params.model_fields) == [
        "batch_size",
        "cfg",
        "checkpoint",
        "sampler",
        "scheduler",
    ]
    assert sorted(MockBackend.params_type.model_fields) == ["mock_fail"]
