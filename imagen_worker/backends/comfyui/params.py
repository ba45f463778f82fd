"""The params a ComfyUI job may carry, as a pydantic model built from the config.

A param exists only if the workflow binds it. The built-in ones have fixed types and ranges;
those that pick a file or an algorithm (checkpoint, LoRA, sampler, scheduler) take only values
the operator listed; a custom binding needs a declared type (``params:`` in the block). What
the row has a column for (prompt, seed, size, steps, ...) is never a param. Input images are
``params.images``: one required Storage key in the owner's folder per ``image.NAME`` binding.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model
from pydantic_core import PydanticCustomError

from imagen_worker.backends.base import ROW_FIELDS, Params
from imagen_worker.backends.comfyui.workflows import IMAGE_BINDING, RESERVED_PARAMS, Workflow, WorkflowError
from imagen_worker.inputs import IMAGES_PARAM, OwnedKey

# Samplers and schedulers every ComfyUI since 0.3.56 ships (KSampler's sampler_name and
# scheduler lists); operators may list others their install has.
DEFAULT_SAMPLERS = (
    "euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "lms", "dpmpp_2s_ancestral",
    "dpmpp_sde", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "ddim", "uni_pc", "lcm",
)  # fmt: skip
DEFAULT_SCHEDULERS = ("normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "beta")

# Built-in params with a fixed type and range: name -> (type, lowest, highest).
RANGED: dict[str, tuple[type, float, float]] = {
    "cfg": (float, 0, 30),
    "denoise": (float, 0, 1),
    "lora_strength": (float, -4, 4),
    "batch_size": (int, 1, 64),  # the backend's max_batch is checked as well
}
# Built-in params whose values come from an operator's allowlist: param -> config key.
CHOICES = {"checkpoint": "checkpoints", "lora": "loras", "sampler": "samplers", "scheduler": "schedulers"}


class ParamSpec(BaseModel):
    """An operator-declared job param for a custom binding (``params.NAME`` in the block)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["int", "float", "string", "bool"] = "string"  # with choices: their own types
    min: float | None = None
    max: float | None = None
    choices: list[str | int | float] | None = Field(default=None, min_length=1)
    max_length: int = Field(default=200, ge=1, le=8000)


@dataclass(frozen=True)
class Vocabulary:
    """The operator's allowlists and declarations, from the config block."""

    checkpoints: tuple[str, ...] = ()
    loras: tuple[str, ...] = ()
    samplers: tuple[str, ...] = DEFAULT_SAMPLERS
    schedulers: tuple[str, ...] = DEFAULT_SCHEDULERS
    samplers_listed: bool = False  # False: the defaults above, not checked against /object_info
    schedulers_listed: bool = False
    declared: Mapping[str, ParamSpec] = field(default_factory=dict)

    def choices(self, param: str) -> tuple[str, ...]:
        values: tuple[str, ...] = getattr(self, CHOICES[param])
        return values


class ComfyUIParams(Params):
    def batch(self) -> int:
        value = getattr(self, "batch_size", None)
        return value if isinstance(value, int) else 1


def _one_of(choices: tuple[Any, ...]) -> Callable[[Any], Any]:
    shown = ", ".join(map(str, choices[:12])) + (", ..." if len(choices) > 12 else "")

    def check(value: Any) -> Any:
        # Same type as well as equal: True is not the choice 1, nor 2.0 the choice 2.
        if not any(value == choice and type(value) is type(choice) for choice in choices):
            raise PydanticCustomError(
                "not_allowed", "not one of the allowed values ({allowed})", {"allowed": shown}
            )
        return value

    return check


def _declared(spec: ParamSpec) -> Any:
    kind: Any
    if spec.choices is not None and "type" not in spec.model_fields_set:
        return Annotated[Any, AfterValidator(_one_of(tuple(spec.choices)))]
    if spec.type == "int":
        kind = Annotated[int, Field(ge=spec.min, le=spec.max)]
    elif spec.type == "float":
        kind = Annotated[float, Field(ge=spec.min, le=spec.max, allow_inf_nan=False)]
    elif spec.type == "bool":
        kind = bool
    else:
        kind = Annotated[str, Field(max_length=spec.max_length)]
    if spec.choices is not None:
        kind = Annotated[kind, AfterValidator(_one_of(tuple(spec.choices)))]
    return kind


def closed(workflow: Workflow, vocabulary: Vocabulary) -> frozenset[str]:
    """Bound choice params the operator allows no value for (e.g. ``checkpoint`` by default)."""
    return frozenset(p for p in CHOICES if p in workflow.bindings and not vocabulary.choices(p))


def params_model(workflow: Workflow, vocabulary: Vocabulary, *, strict: bool) -> type[ComfyUIParams]:
    """The model for jobs run with ``workflow``; ``strict`` (the configured workflow) refuses
    bindings that have no type, while a per-job workflow's untyped bindings are simply not params."""
    fields: dict[str, Any] = {}
    if workflow.image_names:
        keys: dict[str, Any] = {name: (OwnedKey, ...) for name in workflow.image_names}
        images = create_model("InputImages", __base__=Params, **keys)
        fields[IMAGES_PARAM] = (images, ...)
    for name in workflow.bindings:
        if name in ROW_FIELDS or name.startswith(IMAGE_BINDING):
            continue
        if name in RANGED:
            kind, lowest, highest = RANGED[name]
            finite = False if kind is float else None
            fields[name] = (Annotated[kind, Field(ge=lowest, le=highest, allow_inf_nan=finite)], None)
        elif name in CHOICES:
            allowed = vocabulary.choices(name)
            if allowed:
                fields[name] = (Annotated[str, AfterValidator(_one_of(allowed))], None)
        elif name in vocabulary.declared:
            fields[name] = (_declared(vocabulary.declared[name]), None)
        elif strict:
            known = ", ".join([*RANGED, *CHOICES])
            raise WorkflowError(
                f"bindings.{name}: a job param needs a type: use a built-in one ({known}) or declare "
                f"params.{name} (type, min, max or choices)"
            )
    if strict:
        for name in vocabulary.declared:
            if name in ROW_FIELDS or name in RESERVED_PARAMS or name in RANGED or name in CHOICES:
                raise WorkflowError(f"params.{name}: {name!r} is built in and cannot be redeclared")
            if name not in workflow.bindings:
                raise WorkflowError(f"params.{name}: declared but not bound; add bindings.{name}")
    model: type[ComfyUIParams] = create_model("ComfyUIJobParams", __base__=ComfyUIParams, **fields)
    return model
