"""Reading a ``/history/{id}`` entry: did the prompt finish, how, and which files it left."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeGuard

from imagen_worker.backends.comfyui import failures
from imagen_worker.backends.comfyui.client import FileRef
from imagen_worker.errors import RetryableError


def output_files(entry: Mapping[str, Any]) -> list[FileRef]:
    """Every file in ``history.outputs``, images first; ``temp`` (preview) files only as a fallback."""
    refs: list[FileRef] = []
    for node_id, node_outputs in (entry.get("outputs") or {}).items():
        if not isinstance(node_outputs, Mapping):
            continue
        for kind, items in node_outputs.items():
            for item in items if isinstance(items, list) else []:
                if isinstance(item, Mapping) and isinstance(item.get("filename"), str):
                    refs.append(
                        FileRef(
                            node_id=str(node_id),
                            kind=str(kind),
                            filename=item["filename"],
                            subfolder=str(item.get("subfolder") or ""),
                            type=str(item.get("type") or "output"),
                        )
                    )
    kept = [ref for ref in refs if ref.type != "temp"]
    if not any(ref.kind == "images" for ref in kept):
        kept = refs
    return sorted(kept, key=lambda ref: (ref.kind != "images", ref.type == "temp"))


def finished(entry: dict[str, Any] | None) -> TypeGuard[dict[str, Any]]:
    if not entry:
        return False
    status = entry.get("status")
    return isinstance(status, Mapping) and status.get("status_str") in ("success", "error")


def raise_for_outcome(entry: Mapping[str, Any], instance: str) -> None:
    status = entry.get("status") or {}
    if status.get("status_str") == "success":
        return
    for kind, data in reversed(
        [m for m in status.get("messages") or [] if isinstance(m, list) and len(m) == 2]
    ):
        if kind == "execution_error":
            raise failures.execution_error(data, instance)
        if kind == "execution_interrupted":
            raise failures.interrupted(data, instance)
    raise RetryableError(
        f"ComfyUI at {instance} ended the prompt with status {status.get('status_str')!r}",
        detail={"instance": instance, "status": status},
    )


def class_type(graph: Mapping[str, Any], node_id: str) -> str | None:
    node = graph.get(node_id)
    return node.get("class_type") if isinstance(node, Mapping) else None
