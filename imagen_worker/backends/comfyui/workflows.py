"""Workflows: which API-format graph runs, and how a request's fields are patched into it.

A workflow is an API-format graph (``{node_id: {"class_type", "inputs", "_meta"}}``) plus
*bindings*: ``param -> [(node id, input name), ...]``. Rendering deep-copies the graph and sets
those inputs; it never substitutes strings, so a prompt full of quotes or braces cannot break
the JSON. Every saver node gets a job-unique ``filename_prefix`` so ComfyUI's node cache can
never hand back another job's file.

Input images bind as ``image.NAME`` (``image.init -> "Init Image.image"``): the job names the
image in ``params.images.NAME``, the adapter uploads it to ComfyUI, and rendering sets the bound
``LoadImage`` / ``LoadImageMask`` input to the uploaded file's name.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from imagen_worker.backends.base import GenerateRequest
from imagen_worker.inputs import IMAGE_NAME

# Request fields every template may bind; ``params`` keys beyond these must be declared.
STANDARD_PARAMS = ("prompt", "negative_prompt", "seed", "steps", "width", "height")
# ``params`` keys that steer the adapter itself and are never bound to an input.
RESERVED_PARAMS = frozenset({"workflow", "bindings", "images"})
# Bindings named ``image.NAME`` take the job's input image NAME (``params.images.NAME``).
IMAGE_BINDING = "image."
# Templates must bind these: a workflow that ignores the prompt or the seed is a mistake.
REQUIRED_BINDINGS = ("prompt", "seed")
# Inputs that name the model file, for ``GenerateResult.model``.
MODEL_INPUTS = ("ckpt_name", "unet_name")

EXPORT_HINT = (
    "this is a UI-format workflow (it has 'nodes' and 'links'); ComfyUI's /prompt accepts only the "
    "API format: in ComfyUI use Workflow > Export (API), or enable dev mode in the settings and use "
    "'Save (API Format)'"
)

# The built-in templates share node ids (see templates/*.json), hence one binding map per kind.
_BUILTIN_BINDINGS: dict[str, str | list[str]] = {
    "prompt": "6.text",
    "negative_prompt": "7.text",
    "seed": "3.seed",
    "steps": "3.steps",
    "width": "5.width",
    "height": "5.height",
    "batch_size": "5.batch_size",
    "checkpoint": "4.ckpt_name",
    "cfg": "3.cfg",
    "sampler": "3.sampler_name",
    "scheduler": "3.scheduler",
}
# img2img: node 5 scales the init image to the job's size, 12 repeats its latent per batch.
_IMG2IMG_BINDINGS: dict[str, str | list[str]] = {
    **_BUILTIN_BINDINGS,
    "batch_size": "12.amount",
    "denoise": "3.denoise",
    "image.init": "10.image",
}
# inpaint: as img2img, plus the mask (white = repaint), scaled to the same size by node 15.
_INPAINT_BINDINGS: dict[str, str | list[str]] = {
    **_IMG2IMG_BINDINGS,
    "width": ["5.width", "15.width"],
    "height": ["5.height", "15.height"],
    "image.mask": "13.image",
}
_TEMPLATE_BINDINGS = {
    "flux-schnell": _BUILTIN_BINDINGS,
    "sdxl": _BUILTIN_BINDINGS,
    "sd15": _BUILTIN_BINDINGS,
    "sdxl-img2img": _IMG2IMG_BINDINGS,
    "sd15-img2img": _IMG2IMG_BINDINGS,
    "sdxl-inpaint": _INPAINT_BINDINGS,
    "sd15-inpaint": _INPAINT_BINDINGS,
}
BUILTIN_TEMPLATES = tuple(_TEMPLATE_BINDINGS)


class WorkflowError(ValueError):
    """The workflow or a binding cannot work; the caller turns it into a config or job error."""


@dataclass(frozen=True)
class InputRef:
    node_id: str
    input: str


@dataclass(frozen=True)
class Workflow:
    """A validated graph with its bindings; ``render`` makes one job's prompt from it."""

    source: str
    graph: Mapping[str, Any]
    bindings: Mapping[str, tuple[InputRef, ...]]
    defaults: Mapping[str, Any]

    @property
    def image_names(self) -> tuple[str, ...]:
        """The input images this workflow binds (``image.NAME`` bindings)."""
        return tuple(p.removeprefix(IMAGE_BINDING) for p in self.bindings if p.startswith(IMAGE_BINDING))

    def render(
        self, request: GenerateRequest, filename_prefix: str, images: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """The graph for one job: bound inputs set, every saver writing under ``filename_prefix``.

        ``images`` maps each bound input image to the file name ComfyUI knows it by.
        """
        values = {**self.defaults, **_request_values(request)}
        images = images or {}
        missing = [name for name in self.image_names if name not in images]
        if missing:
            raise WorkflowError(
                f"{self.source} needs the input image(s) {', '.join(missing)} (params.images)"
            )
        values.update({IMAGE_BINDING + name: value for name, value in images.items()})
        if request.style is not None and "style" in self.bindings:
            values["style"] = request.style  # otherwise the pipeline styles the prompt text itself
        unbound = sorted(key for key in values if key not in self.bindings and key not in STANDARD_PARAMS)
        if unbound:
            raise WorkflowError(
                f"{self.source} has no binding for parameter(s) {', '.join(unbound)} "
                f"(bound: {', '.join(sorted(self.bindings)) or 'none'})"
            )
        graph = copy.deepcopy(dict(self.graph))
        for param, value in values.items():
            for ref in self.bindings.get(param, ()):
                graph[ref.node_id]["inputs"][ref.input] = _literal(value)
        for node in graph.values():
            if "filename_prefix" in node.get("inputs", {}):
                node["inputs"]["filename_prefix"] = filename_prefix
        return graph


def model_name(graph: Mapping[str, Any]) -> str | None:
    """The first checkpoint/UNet file the graph loads, for the result's ``model``."""
    for node in graph.values():
        for key in MODEL_INPUTS:
            value = node.get("inputs", {}).get(key)
            if isinstance(value, str):
                return value
    return None


def check_api_format(data: Any, source: str) -> dict[str, Any]:
    """Return ``data`` as an API-format graph or raise ``WorkflowError`` saying what is wrong."""
    if isinstance(data, Mapping) and isinstance(data.get("nodes"), list) and "links" in data:
        raise WorkflowError(f"{source}: {EXPORT_HINT}")
    if not isinstance(data, Mapping) or not data:
        raise WorkflowError(f"{source}: expected an API-format workflow (a JSON object of nodes)")
    for node_id, node in data.items():
        if not isinstance(node, Mapping) or not isinstance(node.get("class_type"), str):
            raise WorkflowError(
                f"{source}: node {node_id!r} has no class_type; is this an API-format export?"
            )
        if not isinstance(node.get("inputs", {}), Mapping):
            raise WorkflowError(f"{source}: node {node_id!r} has no inputs object")
    return {str(key): value for key, value in data.items()}


def parse_bindings(graph: Mapping[str, Any], raw: Any, source: str) -> dict[str, tuple[InputRef, ...]]:
    """Resolve ``{param: "node.input" | ["node.input", ...]}``; node = id or unique ``_meta.title``."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise WorkflowError("bindings must be a mapping of parameter -> 'node.input'")
    parsed: dict[str, tuple[InputRef, ...]] = {}
    for param, targets in raw.items():
        if param in RESERVED_PARAMS:
            raise WorkflowError(f"bindings.{param}: {param!r} is reserved")
        if param.startswith(IMAGE_BINDING) and not IMAGE_NAME.fullmatch(param.removeprefix(IMAGE_BINDING)):
            raise WorkflowError(
                f"bindings.{param}: an input image's name is 1-32 lowercase letters, digits or _, "
                "starting with a letter (image.init, image.mask)"
            )
        items = [targets] if isinstance(targets, str) else targets
        if not isinstance(items, list) or not items or not all(isinstance(t, str) for t in items):
            raise WorkflowError(f"bindings.{param}: expected 'node.input' or a list of them")
        parsed[str(param)] = tuple(_resolve(graph, target, f"bindings.{param}", source) for target in items)
    return parsed


def load_workflow(spec: str, bindings: Any = None, checkpoint: str | None = None) -> Workflow:
    """A built-in template by name, or an API-format JSON file by path (read from local disk)."""
    if spec in BUILTIN_TEMPLATES:
        text = resources.files(__package__).joinpath("templates", f"{spec}.json").read_text("utf-8")
        graph = check_api_format(json.loads(text), f"built-in template {spec!r}")
        if bindings is not None and not isinstance(bindings, Mapping):
            raise WorkflowError("bindings must be a mapping of parameter -> 'node.input'")
        parsed = parse_bindings(graph, {**_TEMPLATE_BINDINGS[spec], **(bindings or {})}, spec)
        defaults = {"checkpoint": checkpoint} if checkpoint else {}
        return Workflow(source=f"template {spec!r}", graph=graph, bindings=parsed, defaults=defaults)
    if checkpoint is not None:
        raise WorkflowError("'checkpoint' applies to the built-in templates only; bind it in your workflow")
    path = Path(spec).expanduser()
    if path.suffix.lower() != ".json":
        raise WorkflowError(
            f"workflow {spec!r} is neither a built-in template ({', '.join(BUILTIN_TEMPLATES)}) "
            "nor a path to a .json file"
        )
    try:
        data = json.loads(path.read_text("utf-8"))
    except OSError as exc:
        raise WorkflowError(f"cannot read workflow file {spec}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise WorkflowError(f"workflow file {spec} is not valid JSON: {exc}") from None
    graph = check_api_format(data, f"workflow file {spec}")
    parsed = parse_bindings(graph, bindings, spec)
    missing = [name for name in REQUIRED_BINDINGS if name not in parsed]
    if missing:
        raise WorkflowError(f"workflow file {spec}: bindings must include {', '.join(missing)}")
    return Workflow(source=f"workflow file {spec}", graph=graph, bindings=parsed, defaults={})


def job_workflow(spec: Mapping[str, Any]) -> Workflow:
    """A job's own workflow, ``{"graph": <API format>, "bindings": {...}}`` or a bare graph.

    It reaches the adapter only from a trusted source: the operator-only ``jobs.workflow``
    column, or ``params.workflow`` of an owner listed in ``workflow_owners``.
    """
    if isinstance(spec, Mapping) and "graph" not in spec:
        spec = {"graph": spec}  # a bare API-format graph: nothing bound, it runs as written
    if not isinstance(spec, Mapping):
        raise WorkflowError('a job workflow is {"graph": <API-format workflow>, "bindings": {...}}')
    unknown = sorted(str(key) for key in spec if key not in ("graph", "bindings"))
    if unknown:
        raise WorkflowError(f"a job workflow has only graph and bindings (not {', '.join(unknown)})")
    graph = check_api_format(spec["graph"], "the job's workflow")
    bindings = parse_bindings(graph, spec.get("bindings"), "the job's workflow")
    return Workflow(source="the job's workflow", graph=graph, bindings=bindings, defaults={})


def _request_values(request: GenerateRequest) -> dict[str, Any]:
    values: dict[str, Any] = {"prompt": request.prompt, "seed": request.seed}
    values["width"], values["height"] = request.width, request.height
    if request.negative_prompt is not None:
        values["negative_prompt"] = request.negative_prompt
    if request.steps is not None:
        values["steps"] = request.steps
    values.update({k: v for k, v in request.params.items() if k not in RESERVED_PARAMS})
    return values


def _literal(value: Any) -> Any:
    """A JSON list in an input is read as a link; list literals must be wrapped."""
    return {"__value__": value} if isinstance(value, list | tuple) else value


def _resolve(graph: Mapping[str, Any], target: str, where: str, source: str) -> InputRef:
    node_ref, dot, input_name = target.rpartition(".")
    if not dot or not node_ref or not input_name:
        raise WorkflowError(f"{where}: {target!r} is not 'node.input' (node id or title, then input name)")
    if node_ref in graph:
        node_id = node_ref
    else:
        titled = [nid for nid, node in graph.items() if node.get("_meta", {}).get("title") == node_ref]
        if len(titled) != 1:
            problem = "no node has" if not titled else f"{len(titled)} nodes ({', '.join(titled)}) have"
            raise WorkflowError(f"{where}: {problem} the id or title {node_ref!r} in {source}")
        node_id = titled[0]
    inputs = graph[node_id].get("inputs", {})
    if input_name not in inputs:
        known = ", ".join(sorted(inputs)) or "none"
        raise WorkflowError(
            f"{where}: node {node_id} ({graph[node_id]['class_type']}) has no input {input_name!r} "
            f"(inputs: {known})"
        )
    return InputRef(node_id, input_name)
