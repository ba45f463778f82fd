"""Does an instance have what the workflow names? Checked against ``/object_info``.

Every node class the configured workflow uses must be installed, every choice-list input the
workflow sets (``ckpt_name``, ``sampler_name``, ``lora_name``, ...) must name something the
instance lists, and so must every entry of the operator's allowlists. Otherwise each job would
fail later with ComfyUI's "value not in list".
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from imagen_worker.backends.comfyui.client import ComfyUIClient
from imagen_worker.backends.comfyui.params import CHOICES, Vocabulary
from imagen_worker.backends.comfyui.workflows import IMAGE_BINDING, Workflow

_SHOWN = 12


def combo_options(spec: Mapping[str, Any], input_name: str) -> list[Any] | None:
    """The choices of a list input in ``/object_info`` (old ``[[...], {}]`` or ``["COMBO", {"options"}]``)."""
    inputs = spec.get("input") or {}
    for group in ("required", "optional"):
        entry = (inputs.get(group) or {}).get(input_name)
        if not isinstance(entry, list) or not entry:
            continue
        if isinstance(entry[0], list):
            return entry[0]
        if entry[0] == "COMBO" and len(entry) > 1 and isinstance(entry[1], dict):
            options = entry[1].get("options")
            return options if isinstance(options, list) else None
    return None


def _there(options: list[Any]) -> str:
    shown = ", ".join(map(str, options[:_SHOWN])) + (", ..." if len(options) > _SHOWN else "")
    return f"there: {shown}" if options else "there are none"


async def problems(client: ComfyUIClient, workflow: Workflow, vocabulary: Vocabulary) -> list[str]:
    """One sentence per thing the instance lacks; empty when it has everything."""
    graph: dict[str, Any] = copy.deepcopy(dict(workflow.graph))
    for param, value in workflow.defaults.items():
        for ref in workflow.bindings.get(param, ()):
            graph[ref.node_id]["inputs"][ref.input] = value
    specs: dict[str, dict[str, Any] | None] = {}
    for node in graph.values():
        class_type = node["class_type"]
        if class_type not in specs:
            specs[class_type] = await client.object_info(class_type)
    # Input-image loaders get each job's uploaded file; their placeholder need not exist.
    per_job = {
        (r.node_id, r.input)
        for p, refs in workflow.bindings.items()
        if p.startswith(IMAGE_BINDING)
        for r in refs
    }
    found: list[str] = []
    for node_id, node in graph.items():
        spec = specs[node["class_type"]]
        if spec is None:
            found.append(f"node {node_id}: {node['class_type']} is not installed")
            continue
        for name, value in (node.get("inputs") or {}).items():
            per_job_file = (node_id, name) in per_job
            options = combo_options(spec, name) if isinstance(value, str) and not per_job_file else None
            if options is not None and value not in options:
                found.append(f"{name} {value!r} (node {node_id}) is not installed; {_there(options)}")
    for param, key in CHOICES.items():
        listed = getattr(vocabulary, f"{key}_listed", True)
        allowed = vocabulary.choices(param)
        for ref in workflow.bindings.get(param, ()) if listed else ():
            spec = specs.get(graph[ref.node_id]["class_type"])
            options = combo_options(spec, ref.input) if spec else None
            missing = [value for value in allowed if options is not None and value not in options]
            if missing:
                found.append(f"{key} {', '.join(map(repr, missing))} not installed; {_there(options or [])}")
    return found
