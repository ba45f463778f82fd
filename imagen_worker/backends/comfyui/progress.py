"""One overall percentage for a ComfyUI prompt, from the socket's per-node events.

ComfyUI reports progress per node: ``progress`` ({value, max, node}) counts the current node's
steps from 0 every time, and 0.3.60+ also sends ``progress_state`` snapshots of every started
node ({value, max, state}). A web page wants one number for the whole workflow, so each node
gets a weight: its ``steps`` input when it has one (samplers take nearly all the time), else 1;
a node that reports a larger ``max`` (steps, batch size) takes that as its weight. The percentage
is the weight of finished and cached nodes plus the current nodes' done share, over the total,
and it never goes down. Nodes outside the outputs' ancestry never run, so the last step to 100
comes with the end of the prompt. The ETA extrapolates the average rate since execution
started, shown once a few steps were seen (a burst of quick steps, such as a batch of frames,
would make a rate over the last steps alone promise far too much).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Mapping
from typing import Any

from imagen_worker.backends.base import JobContext
from imagen_worker.backends.comfyui.client import PREVIEW

# Step events needed before an ETA is shown: the first steps include model loading.
ETA_AFTER_STEPS = 3


class Stage(enum.StrEnum):
    """What the job is doing, for a web page's label."""

    QUEUED = "queued"  # waiting in ComfyUI's queue
    RUNNING = "running"  # a node without steps: loading, encoding, decoding, saving
    SAMPLING = "sampling"  # a node reporting steps
    FINISHED = "finished"


class ProgressTracker:
    """Overall progress of one prompt; ``update`` takes each socket event, ``snapshot`` reports."""

    def __init__(self, graph: Mapping[str, Any], clock: Callable[[], float] = time.monotonic) -> None:
        self._graph = graph
        self._weights = {str(nid): float(_steps(node) or 1) for nid, node in graph.items()}
        self._done: set[str] = set()
        self._running: dict[str, float] = {}  # node id -> done fraction of that node
        self._clock = clock
        self._started_at: float | None = None  # when execution started (or we first heard of it)
        self._steps_seen = 0
        self._percent = 0.0
        self._stage = Stage.QUEUED
        self._node: str | None = None
        self._step: tuple[float, float] | None = None

    @property
    def percent(self) -> float:
        return self._percent

    def update(self, kind: str, data: Mapping[str, Any]) -> bool:
        """Fold one event in; True when the snapshot changed."""
        before = (self._percent, self._stage, self._node, self._step)
        if self._started_at is None and kind != "status":
            self._started_at = self._clock()
        if kind == "execution_start":
            self._stage = Stage.RUNNING
        elif kind == "execution_cached":
            self._finish(*(str(n) for n in data.get("nodes") or []))
        elif kind == "executing":
            node = data.get("node")
            self._finish(*[n for n in self._running if n != node])
            if node is None:
                self._stage, self._node, self._step = Stage.FINISHED, None, None
                self._percent = 100.0
            else:
                self._start(str(node))
        elif kind == "executed" and data.get("node") is not None:
            self._finish(str(data["node"]))
        elif kind == "progress" and data.get("node") is not None:
            self._steps(str(data["node"]), _number(data.get("value")), _number(data.get("max")))
        elif kind == "progress_state":
            nodes = data.get("nodes")
            for nid, state in nodes.items() if isinstance(nodes, Mapping) else []:
                if not isinstance(state, Mapping):
                    continue
                if state.get("state") == "finished":
                    self._finish(str(nid))
                elif state.get("state") == "running":
                    value, maximum = _number(state.get("value")), _number(state.get("max"))
                    # 0.3.64 sends value 0 / max 1 for a node that has only started.
                    if maximum > 1 or value > 0:
                        self._steps(str(nid), value, maximum, count=False)
                    else:
                        self._start(str(nid))
        else:
            return False
        self._recompute()
        return before != (self._percent, self._stage, self._node, self._step)

    def snapshot(self) -> dict[str, Any]:
        """The keys a web page shows: percent, eta_seconds, node, node_type, stage, message."""
        node_type = _class_type(self._graph, self._node)
        return {
            "percent": round(self._percent, 1),
            "eta_seconds": self._eta(),
            "node": self._node,
            "node_type": node_type,
            "stage": self._stage.value,
            "message": self._message(node_type),
        }

    # --- internals ------------------------------------------------------------------

    def _start(self, node: str) -> None:
        if node in self._done:
            return
        self._running.setdefault(node, 0.0)
        self._node = node
        self._step = None
        self._stage = Stage.RUNNING

    def _finish(self, *nodes: str) -> None:
        for node in nodes:
            self._done.add(node)
            self._running.pop(node, None)
            if node == self._node:
                self._step = None

    def _steps(self, node: str, value: float, maximum: float, *, count: bool = True) -> None:
        if node in self._done or maximum <= 0:
            return
        if maximum > self._weights.get(node, 1.0):
            self._weights[node] = maximum
        self._running[node] = min(max(value / maximum, 0.0), 1.0)
        self._node, self._step, self._stage = node, (value, maximum), Stage.SAMPLING
        if count:
            self._steps_seen += 1

    def _recompute(self) -> None:
        # An adopted prompt (a retry following an earlier attempt's) comes without its graph:
        # with no total to divide by, the percentage waits for the end instead of guessing.
        if self._stage is Stage.FINISHED or not self._graph:
            return
        total = sum(self._weights.values()) or 1.0
        done = sum(self._weights.get(n, 1.0) for n in self._done)
        done += sum(self._weights.get(n, 1.0) * share for n, share in self._running.items())
        self._percent = max(self._percent, min(100.0 * done / total, 99.9))

    def _eta(self) -> int | None:
        if self._stage is Stage.FINISHED:
            return 0
        if self._started_at is None or self._steps_seen < ETA_AFTER_STEPS:
            return None
        elapsed = self._clock() - self._started_at
        if elapsed <= 0 or self._percent <= 0:
            return None
        return max(1, round((100.0 - self._percent) * elapsed / self._percent))

    def _message(self, node_type: str | None) -> str:
        if self._stage is Stage.QUEUED:
            return "waiting in ComfyUI's queue"
        if self._stage is Stage.FINISHED:
            return "finished"
        if self._node is None:
            where = "the workflow"
        else:
            where = f"{node_type} (node {self._node})" if node_type else f"node {self._node}"
        if self._step is not None:
            return f"step {self._step[0]:g} of {self._step[1]:g} in {where}"
        return f"running {where}"


def _steps(node: Any) -> int | None:
    inputs = node.get("inputs") if isinstance(node, Mapping) else None
    steps = inputs.get("steps") if isinstance(inputs, Mapping) else None
    return steps if isinstance(steps, int) and not isinstance(steps, bool) and steps > 0 else None


def _class_type(graph: Mapping[str, Any], node: str | None) -> str | None:
    entry = graph.get(node) if node is not None else None
    value = entry.get("class_type") if isinstance(entry, Mapping) else None
    return value if isinstance(value, str) else None


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


class JobProgress:
    """Feeds one prompt's socket events to the job: the overall percentage and preview frames."""

    def __init__(self, ctx: JobContext, graph: Mapping[str, Any]) -> None:
        self._ctx = ctx
        self.tracker = ProgressTracker(graph)
        self._report()

    def feed(self, kind: str | None, data: Mapping[str, Any]) -> None:
        if kind == PREVIEW:
            image = data.get("image")
            if isinstance(image, bytes) and image:
                self._ctx.report_preview(image, str(data.get("mime_type")))
        elif kind is not None and self.tracker.update(kind, data):
            self._report()

    def _report(self) -> None:
        snapshot = self.tracker.snapshot()
        self._ctx.report_progress(snapshot["percent"], 100.0, **snapshot)
