"""What `imagen backends` and `imagen-worker check` learn from each instance: version, queue,
socket, and whether every model the workflow and the allowlists name is installed there."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from imagen_worker.backends.comfyui import ComfyUIBackend
from imagen_worker.backends.comfyui.installed import combo_options
from imagen_worker.check import run_checks
from imagen_worker.config import load_config
from imagen_worker.errors import ConfigError, RetryableError
from tests.backends.comfyui.conftest import BackendFactory
from tests.backends.comfyui.support import FAST, RecordingContext, make_request
from tests.fakes.comfyui import FakeComfyUI


async def test_a_healthy_instance_shows_version_queue_socket_and_models(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    backend = await make_backend(fake, workflow="sdxl")

    health = await backend.health()

    assert health.ok
    assert health.detail == f"{fake.url}: ComfyUI 0.3.64, queue 0, socket connected; models ok"
    info = health.info[fake.url]
    assert (info["comfyui_version"], info["queue_remaining"], info["socket_connected"]) == ("0.3.64", 0, True)


async def test_a_refused_connection_is_known_at_once_and_said_in_words(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    await fake.stop()  # nothing listens on its port now
    loop = asyncio.get_running_loop()
    started = loop.time()

    backend = await make_backend(fake, connect_timeout=10)  # start() waits for the first answer only
    health = await backend.health()

    assert loop.time() - started < 2, "not the 10 s connect timeout"
    assert not health.ok
    assert health.detail == f"{fake.url}: unreachable (connection refused)"


async def test_a_missing_checkpoint_fails_the_check_with_what_is_there(make_backend: BackendFactory) -> None:
    async with FakeComfyUI(checkpoints=("dreamshaper_8.safetensors", "juggernaut.safetensors")) as fake:
        backend = await make_backend(
            fake, workflow="sdxl", checkpoints=["juggernaut.safetensors", "nope.ckpt"]
        )

        health = await backend.health()

    assert not health.ok
    assert (
        "ckpt_name 'sd_xl_base_1.0.safetensors' (node 4) is not installed; "
        "there: dreamshaper_8.safetensors, juggernaut.safetensors" in health.detail
    )
    assert "checkpoints 'nope.ckpt' not installed; there: dreamshaper_8.safetensors" in health.detail
    assert "juggernaut.safetensors'" not in health.detail.split("checkpoints")[1].split(";")[0]


async def test_listed_samplers_are_checked_but_the_default_list_is_not(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    defaults = await make_backend(fake, workflow="sd15")
    listed = await make_backend(fake, workflow="sd15", samplers=["euler", "res_multistep"])

    assert (await defaults.health()).ok, "the default allowlist is not held against a smaller install"
    health = await listed.health()
    assert not health.ok
    assert "samplers 'res_multistep' not installed; there: euler, euler_ancestral" in health.detail


async def test_a_node_class_that_is_not_installed_is_named(
    fake: FakeComfyUI, make_backend: BackendFactory, tmp_path: Path
) -> None:
    graph: dict[str, Any] = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "FancyUpscale", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
    }
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(graph))
    backend = await make_backend(
        fake, workflow=str(path), bindings={"prompt": "3.filename_prefix", "seed": "1.color"}
    )

    health = await backend.health()

    assert not health.ok and "node 2: FancyUpscale is not installed" in health.detail


async def test_an_instance_too_old_for_client_prompt_ids_is_refused_at_start(fake: FakeComfyUI) -> None:
    fake.version = "0.3.40"
    backend = ComfyUIBackend.from_config(
        "gpu", {"type": "comfyui", "urls": [fake.url], "workflow": "sd15", **FAST}
    )

    with pytest.raises(ConfigError) as caught:
        await backend.start()

    assert str(caught.value) == (
        f'backend "gpu": ComfyUI at {fake.url} is version 0.3.40; imagen-worker needs 0.3.56 or newer '
        "(client-chosen prompt ids and interrupting one prompt by id)"
    )
    assert fake.calls("POST", "/prompt") == []


async def test_a_prompt_id_that_is_not_ours_is_a_clear_error_and_the_stray_prompt_is_removed(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    backend = await make_backend(fake)
    fake.honour_prompt_ids = False  # as if the server ignored the id we chose
    fake.pause()

    with pytest.raises(RetryableError) as caught:
        await backend.generate(make_request(), RecordingContext())

    ours = fake.calls("POST", "/prompt")[0].body["prompt_id"]
    assert f"queued our prompt {ours} as " in caught.value.message
    assert "it ignores client-chosen prompt ids" in caught.value.message
    assert fake.pending_prompts == [], "the stray prompt was taken back out of ComfyUI's queue"


async def test_check_fails_the_backend_line_when_the_checkpoint_is_missing(tmp_path: Path) -> None:
    async with FakeComfyUI(checkpoints=("other.safetensors",)) as fake:
        block = {"type": "comfyui", "base_url": fake.url, "workflow": "sdxl", **FAST}
        config = load_config(output={"directory": str(tmp_path)}, backends={"gpu": block})
        results = {r.name: r for r in await run_checks(config, dsn=None)}

    line = results["backend gpu"]
    assert not line.ok
    assert line.detail.startswith(f"comfyui: {fake.url}: ComfyUI 0.3.64, queue 0, socket connected; ")
    assert "there: other.safetensors" in line.detail


def test_both_object_info_list_formats_are_read() -> None:
    classic = {"input": {"required": {"ckpt_name": [["a.safetensors", "b.safetensors"], {"tooltip": "x"}]}}}
    combo = {
        "input": {"optional": {"lora_name": ["COMBO", {"options": ["l.safetensors"], "multiselect": False}]}}
    }
    number = {"input": {"required": {"steps": ["INT", {"default": 20, "min": 1}]}}}

    assert combo_options(classic, "ckpt_name") == ["a.safetensors", "b.safetensors"]
    assert combo_options(combo, "lora_name") == ["l.safetensors"]
    assert combo_options(number, "steps") is None
    assert combo_options(classic, "missing") is None
