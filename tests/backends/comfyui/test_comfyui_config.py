"""The config block: what is accepted, and the sentence each mistake produces."""

from __future__ import annotations

from typing import Any

import pytest

from imagen_worker.backends import create
from imagen_worker.backends.base import OutputDefaults
from imagen_worker.backends.comfyui import ComfyUIBackend
from imagen_worker.errors import ConfigError
from tests.backends.comfyui.conftest import BackendFactory
from tests.backends.comfyui.support import RecordingContext, make_request
from tests.fakes.comfyui import FakeComfyUI

BASE: dict[str, Any] = {"type": "comfyui", "base_url": "http://127.0.0.1:8188", "workflow": "sdxl"}


def test_the_registry_builds_the_adapter_with_documented_defaults() -> None:
    backend = create("gpu", BASE)

    assert isinstance(backend, ComfyUIBackend)
    config = backend.config
    assert config.urls == ("http://127.0.0.1:8188",)
    assert (config.timeout, config.lookahead, config.poll_interval) == (600.0, 1, 3.0)
    assert (config.interrupt_grace, config.connect_timeout, config.workflow_owners) == (
        30.0,
        10.0,
        frozenset(),
    )
    assert (config.limits.max_pixels, config.limits.max_steps, config.limits.max_batch) == (
        2048 * 2048,
        150,
        4,
    )
    assert config.vocabulary.checkpoints == (), (
        "jobs may not choose a checkpoint unless the operator lists some"
    )
    assert backend.capacity == 3


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"base_url": None},
            'backend "gpu": set exactly one of base_url (one ComfyUI) or urls (a pool of instances)',
        ),
        ({"urls": ["http://a:1"]}, 'backend "gpu": set exactly one of base_url'),
        ({"base_url": "127.0.0.1:8188"}, "'127.0.0.1:8188' is not an http(s) URL like http://127.0.0.1:8188"),
        (
            {"base_url": "http://comfy:s3cret@gpu:8188"},
            "a ComfyUI URL must not hold credentials (user:password@); name an environment variable",
        ),
        ({"base_url": None, "urls": []}, "urls must be a non-empty list of http(s) URLs"),
        ({"base_url": None, "urls": ["http://a:1", "http://a:1/"]}, "urls lists the same instance twice"),
        (
            {"workflow": None},
            "workflow: name a built-in template (flux-schnell, sdxl, sd15, sdxl-img2img, sd15-img2img, "
            "sdxl-inpaint, sd15-inpaint) or an API-format",
        ),
        ({"workflow": "sdxl-turbo"}, "workflow 'sdxl-turbo' is neither a built-in template"),
        (
            {"workflow": "/nowhere/wf.json"},
            "cannot read workflow file /nowhere/wf.json: No such file or directory",
        ),
        ({"lookahead": -1}, "lookahead: input should be greater than or equal to 0 (got -1)"),
        ({"lookahead": 17}, "lookahead: input should be less than or equal to 16 (got 17)"),
        ({"lookahead": True}, "lookahead: expected a number, not true/false"),
        ({"timeout": 0}, "timeout: input should be greater than 0 (got 0)"),
        ({"poll_interval": "fast"}, "poll_interval: input should be a valid number"),
        ({"allow_job_workflows": True}, "allow_job_workflows: removed; per-job workflows now come only from"),
        ({"lookhead": 2}, 'backend "gpu": lookhead: unknown key (known: base_url, bindings, checkpoint,'),
        ({"max_pixels": 10}, "max_pixels: input should be greater than or equal to 4096 (got 10)"),
        ({"max_steps": 0}, "max_steps: input should be greater than or equal to 1 (got 0)"),
        ({"checkpoints": "a.safetensors"}, "checkpoints: input should be a valid list"),
        ({"workflow_owners": ["alice"]}, "workflow_owners.0: input should be a valid UUID"),
        ({"bindings": {"guidance": "3.cfg"}}, "bindings.guidance: a job param needs a type"),
        ({"params": {"guidance": {"type": "float"}}}, "params.guidance: declared but not bound"),
        (
            {"params": {"cfg": {"type": "float"}}, "bindings": {"cfg": "3.cfg"}},
            "params.cfg: 'cfg' is built in",
        ),
        (
            {"headers": {"Authorization": "COMFY_PROXY_TOKEN"}},
            "environment variable COMFY_PROXY_TOKEN is not set",
        ),
        (
            {"headers": ["Authorization"]},
            "headers: input should be a valid dictionary",
        ),
        ({"checkpoint": 3}, "checkpoint: input should be a valid string (got 3)"),
    ],
)
def test_bad_config_names_the_backend_and_the_reason(change: dict[str, Any], message: str) -> None:
    block = {key: value for key, value in {**BASE, **change}.items() if value is not None}

    with pytest.raises(ConfigError) as caught:
        ComfyUIBackend.from_config("gpu", block)

    assert message in str(caught.value)
    assert str(caught.value).startswith('backend "gpu": ')
    assert "\n" not in str(caught.value)


async def test_headers_come_from_the_environment_and_reach_http_and_websocket(
    fake: FakeComfyUI, make_backend: BackendFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COMFY_PROXY_TOKEN", "Bearer s3cret-value")
    backend = await make_backend(fake, headers={"Authorization": "COMFY_PROXY_TOKEN"})

    await backend.generate(make_request(), RecordingContext())

    assert "s3cret" not in repr(backend.config)
    for method, path in (("GET", "/ws"), ("POST", "/prompt"), ("GET", "/history/"), ("GET", "/view")):
        assert fake.calls(method, path)[0].headers["Authorization"] == "Bearer s3cret-value"
    assert all("Origin" not in r.headers for r in fake.requests)  # ComfyUI 403s a foreign Origin


def test_the_block_may_set_its_own_output_format_and_quality_and_sets_none_by_default() -> None:
    assert create("gpu", BASE).output_defaults == OutputDefaults()
    chosen = create("gpu", {**BASE, "format": "webp", "quality": 70})
    assert chosen.output_defaults == OutputDefaults(format="webp", quality=70)
    with pytest.raises(ConfigError, match=r"^backend \"gpu\": format: input should be 'png', 'webp' or"):
        create("gpu", {**BASE, "format": "tiff"})
