"""Workflows: built-in templates, user templates with bindings, per-job graphs, UI-format refusal."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from imagen_worker.backends.comfyui import ComfyUIBackend
from imagen_worker.backends.comfyui.workflows import BUILTIN_TEMPLATES, WorkflowError, load_workflow
from imagen_worker.errors import ConfigError, TerminalError
from imagen_worker.inputs import sniff
from tests.backends.comfyui.conftest import BackendFactory
from tests.backends.comfyui.support import RecordingContext, make_request
from tests.fakes.comfyui import FakeComfyUI, tiny_png

USER_GRAPH: dict[str, Any] = {
    "10": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
    "11": {
        "class_type": "CLIPTextEncode",
        "inputs": {"text": "", "clip": ["10", 1]},
        "_meta": {"title": "Pos"},
    },
    "12": {
        "class_type": "CLIPTextEncode",
        "inputs": {"text": "", "clip": ["10", 1]},
        "_meta": {"title": "Neg"},
    },
    "13": {"class_type": "EmptyLatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
    "14": {
        "class_type": "KSampler",
        "inputs": {
            "seed": 0,
            "steps": 30,
            "cfg": 6.5,
            "sampler_name": "euler",
            "scheduler": "normal",
            "denoise": 1.0,
            "model": ["10", 0],
            "positive": ["11", 0],
            "negative": ["12", 0],
            "latent_image": ["13", 0],
        },
        "_meta": {"title": "Sampler"},
    },
    "15": {"class_type": "VAEDecode", "inputs": {"samples": ["14", 0], "vae": ["10", 2]}},
    "16": {"class_type": "SaveImage", "inputs": {"images": ["15", 0], "filename_prefix": "mine"}},
    "17": {"class_type": "PreviewImage", "inputs": {"images": ["15", 0]}},
}
USER_BINDINGS = {
    "prompt": "Pos.text",
    "negative_prompt": "Neg.text",
    "seed": "Sampler.seed",
    "steps": "14.steps",
    "width": "13.width",
    "height": "13.height",
    "cfg": "Sampler.cfg",
    "sampler": ["Sampler.sampler_name"],
}
UI_EXPORT = {
    "last_node_id": 9,
    "last_link_id": 9,
    "nodes": [{"id": 3, "type": "KSampler"}],
    "links": [[1, 4, 0]],
}


def _write(tmp_path: Path, data: Any, name: str = "workflow.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


async def test_a_user_template_is_patched_through_ids_and_titles(
    fake: FakeComfyUI, make_backend: BackendFactory, tmp_path: Path
) -> None:
    backend = await make_backend(fake, workflow=_write(tmp_path, USER_GRAPH), bindings=USER_BINDINGS)
    request = make_request(
        "a fox", negative_prompt="fog", seed=7, steps=3, params={"cfg": 4.0, "sampler": "dpmpp_2m"}
    )

    result = await backend.generate(request, RecordingContext())

    graph = fake.calls("POST", "/prompt")[0].body["prompt"]
    assert (graph["11"]["inputs"]["text"], graph["12"]["inputs"]["text"]) == ("a fox", "fog")
    assert {k: graph["14"]["inputs"][k] for k in ("seed", "steps", "cfg", "sampler_name")} == {
        "seed": 7,
        "steps": 3,
        "cfg": 4.0,
        "sampler_name": "dpmpp_2m",
    }
    assert graph["16"]["inputs"]["filename_prefix"].startswith(f"imagen/{request.job_id}/")
    assert result.model == "sd_xl_base_1.0.safetensors"
    assert [o["type"] for o in result.metadata["outputs"]] == ["output"]  # the temp preview is skipped
    assert USER_GRAPH["11"]["inputs"]["text"] == ""  # the template itself is never modified


async def test_unbound_params_are_refused_by_name(fake: FakeComfyUI, make_backend: BackendFactory) -> None:
    backend = await make_backend(fake)

    with pytest.raises(TerminalError) as caught:
        await backend.generate(make_request(params={"lora": "x", "clip_skip": 2}), RecordingContext())

    assert "has no binding for parameter(s) clip_skip, lora" in caught.value.message
    assert fake.calls("POST", "/prompt") == []


async def test_a_web_user_cannot_send_a_workflow_in_params(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    backend = await make_backend(fake)

    for key in ("workflow", "bindings"):
        with pytest.raises(TerminalError) as caught:
            backend.check_request(make_request(params={key: USER_GRAPH}, owner_user_id=uuid.uuid4()))
        assert caught.value.message.startswith(f"params.{key} is not allowed: ")
        assert "workflow_owners" in caught.value.message
    assert fake.calls("POST", "/prompt") == []


async def test_an_owner_listed_in_workflow_owners_may_send_one(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    owner = uuid.uuid4()
    backend = await make_backend(fake, workflow_owners=[str(owner)])
    params = {"workflow": USER_GRAPH, "bindings": {"prompt": "Pos.text", "seed": "Sampler.seed"}}

    request = backend.check_request(make_request("an owl", seed=9, params=params, owner_user_id=owner))
    result = await backend.generate(request, RecordingContext())

    assert request.params == {} and request.workflow is not None
    graph = fake.calls("POST", "/prompt")[0].body["prompt"]
    assert (graph["11"]["inputs"]["text"], graph["14"]["inputs"]["seed"]) == ("an owl", 9)
    assert result.metadata["workflow"] == "the job's workflow"


async def test_a_trusted_job_workflow_runs_with_its_own_bindings(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    backend = await make_backend(fake)
    workflow = {
        "graph": USER_GRAPH,
        "bindings": {"prompt": "Pos.text", "seed": "Sampler.seed", "cfg": "14.cfg"},
    }

    request = backend.check_request(make_request("an owl", seed=9, params={"cfg": 2.5}, workflow=workflow))
    await backend.generate(request, RecordingContext())

    graph = fake.calls("POST", "/prompt")[0].body["prompt"]
    assert (graph["11"]["inputs"]["text"], graph["14"]["inputs"]["seed"], graph["14"]["inputs"]["cfg"]) == (
        "an owl",
        9,
        2.5,
    )


async def test_ui_format_is_refused_with_export_instructions(
    fake: FakeComfyUI, make_backend: BackendFactory, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as config_error:
        ComfyUIBackend.from_config(
            "gpu", {"type": "comfyui", "base_url": fake.url, "workflow": _write(tmp_path, UI_EXPORT)}
        )
    backend = await make_backend(fake)
    with pytest.raises(TerminalError) as job_error:
        backend.check_request(make_request(workflow={"graph": UI_EXPORT}))

    for message in (str(config_error.value), job_error.value.message):
        assert "UI-format workflow" in message
        assert "Workflow > Export (API)" in message and "Save (API Format)" in message


@pytest.mark.parametrize("name", BUILTIN_TEMPLATES)
async def test_every_built_in_template_renders_and_runs(
    fake: FakeComfyUI, make_backend: BackendFactory, name: str
) -> None:
    backend = await make_backend(fake, workflow=name)
    inputs = {
        n: sniff(n, f"o/{n}.png", tiny_png((9, 9, 9)), 2**20, "gpu")
        for n in backend.config.workflow.image_names
    }

    result = await backend.generate(make_request(width=768, height=512, inputs=inputs), RecordingContext())

    graph = fake.calls("POST", "/prompt")[0].body["prompt"]
    assert (graph["5"]["inputs"]["width"], graph["5"]["inputs"]["height"]) == (768, 512)
    assert result.model == graph["4"]["inputs"]["ckpt_name"]


def test_built_in_checkpoint_and_list_values_are_set_structurally() -> None:
    workflow = load_workflow("flux-schnell", {"sampler": "3.sampler_name"}, "flux1-dev-fp8.safetensors")
    graph = workflow.render(make_request(params={"sampler": ["a", "b"]}), "imagen/j/p")

    assert graph["4"]["inputs"]["ckpt_name"] == "flux1-dev-fp8.safetensors"
    assert graph["5"]["class_type"] == "EmptySD3LatentImage"
    assert graph["3"]["inputs"]["sampler_name"] == {"__value__": ["a", "b"]}  # a bare list would be a link


@pytest.mark.parametrize(
    ("bindings", "problem"),
    [
        ({"seed": "Sampler.seed"}, "bindings must include prompt"),
        ({**USER_BINDINGS, "prompt": "Nope.text"}, "bindings.prompt: no node has the id or title 'Nope'"),
        ({**USER_BINDINGS, "seed": "14.noise_seed"}, "node 14 (KSampler) has no input 'noise_seed'"),
        ({**USER_BINDINGS, "seed": "seed"}, "'seed' is not 'node.input'"),
        ({**USER_BINDINGS, "workflow": "11.text"}, "'workflow' is reserved"),
    ],
)
def test_bad_bindings_are_config_errors(tmp_path: Path, bindings: dict[str, Any], problem: str) -> None:
    with pytest.raises(WorkflowError) as caught:
        load_workflow(_write(tmp_path, USER_GRAPH), bindings)

    assert problem in str(caught.value)


def test_ambiguous_titles_are_refused(tmp_path: Path) -> None:
    graph = {**USER_GRAPH, "12": {**USER_GRAPH["12"], "_meta": {"title": "Pos"}}}

    with pytest.raises(WorkflowError) as caught:
        load_workflow(_write(tmp_path, graph), USER_BINDINGS)

    assert "2 nodes (11, 12) have the id or title 'Pos'" in str(caught.value)
