"""The config block: what is accepted, and the sentence each mistake produces."""

from __future__ import annotations

from typing import Any

import pytest

from imagen_worker.backends import create
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
    assert (config.interrupt_grace, config.connect_timeout, config.allow_job_workflows) == (30.0, 10.0, False)
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
        ({"base_url": None, "urls": []}, "urls must be a non-empty list of http(s) URLs"),
        ({"base_url": None, "urls": ["http://a:1", "http://a:1/"]}, "urls lists the same instance twice"),
        (
            {"workflow": None},
            "workflow: name a built-in template (flux-schnell, sdxl, sd15) or an API-format",
        ),
        ({"workflow": "sdxl-turbo"}, "workflow 'sdxl-turbo' is neither a built-in template"),
        (
            {"workflow": "/nowhere/wf.json"},
            "cannot read workflow /nowhere/wf.json: No such file or directory",
        ),
        ({"lookahead": -1}, "lookahead must be an integer from 0 to 16 (got -1)"),
        ({"lookahead": True}, "lookahead must be an integer from 0 to 16 (got True)"),
        ({"timeout": 0}, "timeout must be a positive number of seconds (got 0)"),
        ({"poll_interval": "fast"}, "poll_interval must be a positive number of seconds (got 'fast')"),
        ({"allow_job_workflows": "yes"}, "allow_job_workflows must be true or false"),
        ({"lookhead": 2}, 'backend "gpu": unknown key(s) lookhead (known: allow_job_workflows, base_url'),
        (
            {"headers": {"Authorization": "COMFY_PROXY_TOKEN"}},
            "environment variable COMFY_PROXY_TOKEN is not set",
        ),
        (
            {"headers": ["Authorization"]},
            "headers must map a header name to the NAME of an environment variable",
        ),
        ({"checkpoint": 3}, "checkpoint must be a model file name"),
    ],
)
def test_bad_config_names_the_backend_and_the_reason(change: dict[str, Any], message: str) -> None:
    block = {key: value for key, value in {**BASE, **change}.items() if value is not None}

    with pytest.raises(ConfigError) as caught:
        ComfyUIBackend.from_config("gpu", block)

    assert message in str(caught.value)
    assert str(caught.value).startswith('backend "gpu": ')


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
