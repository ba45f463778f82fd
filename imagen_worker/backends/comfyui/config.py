"""The ``type: comfyui`` config block: a pydantic model, validated once at startup.

Unknown keys are refused so a typo (``lookhead``) fails loudly instead of silently using a
default; every problem is one line, ``backend "NAME": key: reason``. Header values are
environment variable *names*; the secrets are read here, once, and kept out of ``repr`` so they
never reach a log line. The workflow file is read here too, so a broken one fails at startup.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit
from uuid import UUID

from pydantic import AfterValidator, BeforeValidator, Field, ValidationError, model_validator

from imagen_worker.backends.base import Limits, OutputDefaults, Params, config_error
from imagen_worker.backends.comfyui.params import (
    DEFAULT_SAMPLERS,
    DEFAULT_SCHEDULERS,
    ParamSpec,
    Vocabulary,
    params_model,
)
from imagen_worker.backends.comfyui.workflows import BUILTIN_TEMPLATES, Workflow, WorkflowError, load_workflow
from imagen_worker.errors import ConfigError


def _no_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("expected a number, not true/false")
    return value


def _url(value: str) -> str:
    parts = urlsplit(value)
    if "@" in parts.netloc:  # said without the URL: it holds a password
        raise ValueError(
            "a ComfyUI URL must not hold credentials (user:password@); name an environment "
            "variable under headers instead, e.g. headers: {Authorization: COMFY_PROXY_AUTH}"
        )
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query:
        raise ValueError(f"{value!r} is not an http(s) URL like http://127.0.0.1:8188")
    return value.rstrip("/")


Seconds = Annotated[float, BeforeValidator(_no_bool), Field(gt=0)]
Url = Annotated[str, AfterValidator(_url)]
Names = list[Annotated[str, Field(min_length=1, max_length=255)]]


class ComfyUIBlock(Limits, OutputDefaults):
    """The block as written in the config file (see docs/comfyui.md, "All keys")."""

    type: Literal["comfyui"] = "comfyui"
    base_url: Url | None = None
    urls: list[Url] | None = None
    workflow: str = Field(min_length=1)
    bindings: dict[str, str | list[str]] | None = None
    checkpoint: str | None = Field(default=None, min_length=1)
    # Allowlists for the job params that choose a model file or an algorithm.
    checkpoints: Names = []
    loras: Names = []
    samplers: Names | None = None
    schedulers: Names | None = None
    params: dict[str, ParamSpec] = {}
    workflow_owners: list[UUID] = []
    timeout: Seconds = 600.0
    lookahead: Annotated[int, BeforeValidator(_no_bool), Field(ge=0, le=16)] = 1
    poll_interval: Seconds = 3.0
    interrupt_grace: Seconds = 30.0
    connect_timeout: Seconds = 10.0
    # A socket that stays open but goes silent is dropped this soon (a websocket ping unanswered).
    ping_interval: Seconds = 5.0
    ping_timeout: Seconds = 5.0
    # How long a job may wait for ComfyUI to start it (a free instance, then ComfyUI's queue).
    queue_timeout: Seconds = 1800.0
    headers: dict[str, Annotated[str, Field(min_length=1)]] = {}
    # The job's main output: this node (title or id); else the last saver to run.
    output: str | None = Field(default=None, min_length=1)
    # Keep our history entries on ComfyUI after collection (they are deleted by default).
    keep_history: bool = False
    # Ceiling on one job's downloaded outputs, all files together.
    max_output_bytes: Annotated[int, BeforeValidator(_no_bool), Field(ge=1024)] = 200 * 1024 * 1024

    @model_validator(mode="after")
    def _one_target(self) -> ComfyUIBlock:
        if (self.base_url is None) == (self.urls is None):
            raise ValueError("set exactly one of base_url (one ComfyUI) or urls (a pool of instances)")
        urls = [self.base_url] if self.base_url is not None else self.urls or []
        if not urls:
            raise ValueError("urls must be a non-empty list of http(s) URLs")
        if len(set(urls)) != len(urls):
            raise ValueError("urls lists the same instance twice")
        return self


@dataclass(frozen=True)
class ComfyUIConfig:
    urls: tuple[str, ...]
    workflow: Workflow
    timeout: float = 600.0
    lookahead: int = 1
    poll_interval: float = 3.0
    interrupt_grace: float = 30.0
    connect_timeout: float = 10.0
    ping_interval: float = 5.0
    ping_timeout: float = 5.0
    limits: Limits = field(default_factory=Limits)
    vocabulary: Vocabulary = field(default_factory=Vocabulary)
    workflow_owners: frozenset[UUID] = frozenset()
    # The params a job may carry with the configured workflow.
    params: type[Params] = Params
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    # Outages and other people's work: how long a job may wait for ComfyUI to start it.
    queue_timeout: float = 1800.0
    output: str | None = None
    keep_history: bool = False
    max_output_bytes: int = 200 * 1024 * 1024
    output_defaults: OutputDefaults = field(default_factory=OutputDefaults)


def parse_config(name: str, block: Mapping[str, Any]) -> ComfyUIConfig:
    """Validate ``block``; every problem is a ``ConfigError('backend "NAME": key: reason')``."""

    def fail(reason: str) -> ConfigError:
        return ConfigError(f'backend "{name}": {reason}')

    if "allow_job_workflows" in block:
        raise fail(
            "allow_job_workflows: removed; per-job workflows now come only from `imagen submit "
            "--workflow` or from the owners listed in workflow_owners"
        )
    try:
        parsed = ComfyUIBlock.model_validate(dict(block))
    except ValidationError as exc:
        if any(e["loc"] == ("workflow",) for e in exc.errors()):
            raise fail(
                f"workflow: name a built-in template ({', '.join(BUILTIN_TEMPLATES)}) or an API-format "
                ".json file"
            ) from None
        raise config_error(name, exc, ComfyUIBlock) from None
    try:
        workflow = load_workflow(parsed.workflow, parsed.bindings, parsed.checkpoint)
    except WorkflowError as exc:
        raise fail(str(exc)) from None
    vocabulary = Vocabulary(
        checkpoints=tuple(parsed.checkpoints),
        loras=tuple(parsed.loras),
        samplers=tuple(parsed.samplers if parsed.samplers is not None else DEFAULT_SAMPLERS),
        schedulers=tuple(parsed.schedulers if parsed.schedulers is not None else DEFAULT_SCHEDULERS),
        samplers_listed=parsed.samplers is not None,
        schedulers_listed=parsed.schedulers is not None,
        declared=dict(parsed.params),
    )
    try:
        model = params_model(workflow, vocabulary, strict=True)
    except WorkflowError as exc:
        raise fail(str(exc)) from None
    headers = {}
    for header, env_name in parsed.headers.items():
        value = os.environ.get(env_name)
        if not value:
            raise fail(f"headers.{header}: environment variable {env_name} is not set")
        headers[header] = value
    urls = [parsed.base_url] if parsed.base_url is not None else parsed.urls or []
    return ComfyUIConfig(
        urls=tuple(urls),
        workflow=workflow,
        timeout=parsed.timeout,
        lookahead=parsed.lookahead,
        poll_interval=parsed.poll_interval,
        interrupt_grace=parsed.interrupt_grace,
        connect_timeout=parsed.connect_timeout,
        ping_interval=parsed.ping_interval,
        ping_timeout=parsed.ping_timeout,
        limits=Limits(max_pixels=parsed.max_pixels, max_steps=parsed.max_steps, max_batch=parsed.max_batch),
        vocabulary=vocabulary,
        workflow_owners=frozenset(parsed.workflow_owners),
        params=model,
        headers=headers,
        queue_timeout=parsed.queue_timeout,
        output=parsed.output,
        keep_history=parsed.keep_history,
        max_output_bytes=parsed.max_output_bytes,
        output_defaults=parsed.defaults(),
    )
