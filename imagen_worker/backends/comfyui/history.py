"""Reading a ``/history/{id}`` entry: did the prompt finish, how, and which files it left.

The order of ``history.outputs`` means nothing: ComfyUI 0.3.64 builds it from a Python set, so
it changes with the server's hash seed. The job's main output is therefore chosen on purpose
(``main_node``): the node the backend config names (``output:``, by title or id), else the last
saver in execution order, which the ``executed`` socket events give (in the order the nodes
ran; a SaveImageWebsocket node sends none and counts from its ``executing`` event) and, for a
prompt adopted after a restart that saw no events, the graph's own order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeGuard

from imagen_worker.backends.comfyui import failures
from imagen_worker.backends.comfyui.client import FileRef
from imagen_worker.errors import RetryableError


def output_files(entry: Mapping[str, Any], sent: Sequence[FileRef] = ()) -> list[FileRef]:
    """Every file in ``history.outputs`` and the images ``sent`` over the socket
    (SaveImageWebsocket), images first; ``temp`` files (previews) only if nothing else."""
    refs: list[FileRef] = list(sent)
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


def execution_order(graph: Mapping[str, Any], executed: list[str]) -> list[str]:
    """Node ids in the order they ran: the ``executed`` events seen, then the rest by depth.

    A node runs after every node it takes a link from, so depth in the graph (longest chain of
    links from an input-less node) orders what the events did not show; ties keep id order.
    """
    depth: dict[str, int] = {}

    def depth_of(node_id: str, seen: frozenset[str] = frozenset()) -> int:
        if node_id in depth:
            return depth[node_id]
        node = graph.get(node_id)
        inputs = node.get("inputs", {}) if isinstance(node, Mapping) else {}
        parents = [
            str(value[0])
            for value in inputs.values()
            if isinstance(value, list) and len(value) == 2 and str(value[0]) in graph
        ]
        result = 1 + max((depth_of(p, seen | {node_id}) for p in parents if p not in seen), default=-1)
        depth[node_id] = result
        return result

    rest = sorted((n for n in graph if n not in executed), key=lambda n: (depth_of(str(n)), _id_key(n)))
    return [*executed, *(str(n) for n in rest)]


def _id_key(node_id: str) -> tuple[int, str]:
    return (int(node_id), "") if node_id.isdigit() else (2**63, node_id)


def node_named(graph: Mapping[str, Any], name: str) -> str | None:
    """The node whose id or ``_meta.title`` is ``name`` (an id wins over a title)."""
    if name in graph:
        return name
    titled = [nid for nid, node in graph.items() if isinstance(node, Mapping)
              and (node.get("_meta") or {}).get("title") == name]  # fmt: skip
    return str(titled[0]) if len(titled) == 1 else None


def main_first(
    files: list[FileRef], graph: Mapping[str, Any], executed: list[str], output: str | None
) -> list[FileRef]:
    """The files with the main node's first (each node's files in their own order), then the
    other savers' from the last to run back to the first.

    Raises ``LookupError`` when the configured ``output`` node is not in the graph or saved nothing.
    """
    order = execution_order(graph, executed)
    rank = {node_id: i for i, node_id in enumerate(order)}
    savers = sorted({ref.node_id for ref in files}, key=lambda n: rank.get(n, -1), reverse=True)
    if output is not None:
        main = node_named(graph, output)
        if main is None:
            raise LookupError(f"the workflow has no node with the id or title {output!r} (output)")
        if main not in savers:
            raise LookupError(f"the output node {output!r} (node {main}) saved no file")
    else:
        images = [n for n in savers if any(r.node_id == n and r.kind == "images" for r in files)]
        main = (images or savers)[0]
    ranked = [main, *(n for n in savers if n != main)]
    return [ref for node_id in ranked for ref in files if ref.node_id == node_id]


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
