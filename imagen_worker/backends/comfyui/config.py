"""The ``type: comfyui`` config block, validated once at startup.

Unknown keys are refused so a typo (``lookhead``) fails loudly instead of silently using a
default. Header values are environment variable *names*; the secrets are read here, once, and
kept out of ``repr`` so they never reach a log line.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from imagen_worker.backends.comfyui.workflows import BUILTIN_TEMPLATES, Workflow, WorkflowError, load_workflow
from imagen_worker.errors import ConfigError

_Fail = Callable[[str], ConfigError]

KEYS = frozenset(
    {
        "type",
        "base_url",
        "urls",
        "workflow",
        "bindings",
        "checkpoint",
        "timeout",
        "lookahead",
        "headers",
        "allow_job_workflows",
        "poll_interval",
        "interrupt_grace",
        "connect_timeout",
        # outages and other people's work
        "queue_timeout",
    }
)


@dataclass(frozen=True)
class ComfyUIConfig:
    urls: tuple[str, ...]
    workflow: Workflow
    timeout: float = 600.0
    lookahead: int = 1
    poll_interval: float = 3.0
    interrupt_grace: float = 30.0
    connect_timeout: float = 10.0
    allow_job_workflows: bool = False
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    # Outages and other people's work: how long a job may wait for ComfyUI to start it.
    queue_timeout: float = 1800.0


def parse_config(name: str, block: Mapping[str, Any]) -> ComfyUIConfig:
    """Validate ``block``; every problem is a ``ConfigError('backend "NAME": reason')``."""

    def fail(reason: str) -> ConfigError:
        return ConfigError(f'backend "{name}": {reason}')

    unknown = sorted(str(key) for key in block if key not in KEYS)
    if unknown:
        raise fail(f"unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(KEYS - {'type'}))})")

    if ("base_url" in block) == ("urls" in block):
        raise fail("set exactly one of base_url (one ComfyUI) or urls (a pool of instances)")
    raw_urls = [block["base_url"]] if "base_url" in block else block["urls"]
    if not isinstance(raw_urls, list) or not raw_urls:
        raise fail("urls must be a non-empty list of http(s) URLs")
    urls = tuple(_url(url, fail) for url in raw_urls)
    if len(set(urls)) != len(urls):
        raise fail("urls lists the same instance twice")

    workflow_spec = block.get("workflow")
    if not isinstance(workflow_spec, str) or not workflow_spec:
        raise fail(
            f"workflow: name a built-in template ({', '.join(BUILTIN_TEMPLATES)}) or an API-format .json file"
        )
    checkpoint = block.get("checkpoint")
    if checkpoint is not None and (not isinstance(checkpoint, str) or not checkpoint):
        raise fail("checkpoint must be a model file name, e.g. sd_xl_base_1.0.safetensors")
    try:
        workflow = load_workflow(workflow_spec, block.get("bindings"), checkpoint)
    except WorkflowError as exc:
        raise fail(str(exc)) from None

    allow = block.get("allow_job_workflows", False)
    if not isinstance(allow, bool):
        raise fail("allow_job_workflows must be true or false")
    return ComfyUIConfig(
        urls=urls,
        workflow=workflow,
        timeout=_positive(block, "timeout", 600.0, fail),
        lookahead=_lookahead(block.get("lookahead", 1), fail),
        poll_interval=_positive(block, "poll_interval", 3.0, fail),
        interrupt_grace=_positive(block, "interrupt_grace", 30.0, fail),
        connect_timeout=_positive(block, "connect_timeout", 10.0, fail),
        allow_job_workflows=allow,
        headers=_headers(block.get("headers"), fail),
        queue_timeout=_positive(block, "queue_timeout", 1800.0, fail),
    )


def _url(value: Any, fail: _Fail) -> str:
    parts = urlsplit(value) if isinstance(value, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.netloc or parts.query:
        raise fail(f"{value!r} is not an http(s) URL like http://127.0.0.1:8188")
    return str(value).rstrip("/")


def _positive(block: Mapping[str, Any], key: str, default: float, fail: _Fail) -> float:
    value = block.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise fail(f"{key} must be a positive number of seconds (got {value!r})")
    return float(value)


def _lookahead(value: Any, fail: _Fail) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 16:
        raise fail(f"lookahead must be an integer from 0 to 16 (got {value!r})")
    return value


def _headers(raw: Any, fail: _Fail) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise fail("headers must map a header name to the NAME of an environment variable")
    headers = {}
    for header, env_name in raw.items():
        if not isinstance(env_name, str) or not env_name:
            raise fail(f"headers.{header}: give the name of an environment variable, not the value")
        value = os.environ.get(env_name)
        if not value:
            raise fail(f"headers.{header}: environment variable {env_name} is not set")
        headers[str(header)] = value
    return headers
