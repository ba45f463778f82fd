"""Live progress: one overall percentage across the workflow, an ETA, and preview frames."""

from __future__ import annotations

from typing import Any

from imagen_worker.backends.comfyui.client import parse_preview
from imagen_worker.backends.comfyui.progress import ProgressTracker
from tests.backends.comfyui.conftest import BackendFactory
from tests.backends.comfyui.support import RecordingContext, make_request
from tests.fakes.comfyui import FakeComfyUI

# The sd15 template's shape: a sampler with 10 steps among six one-step nodes (weight 16).
GRAPH: dict[str, Any] = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {}},
    "3": {"class_type": "KSampler", "inputs": {"steps": 10}},
    "8": {"class_type": "VAEDecode", "inputs": {}},
    "9": {"class_type": "SaveImage", "inputs": {}},
}
PID = "p1"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def run_nodes(tracker: ProgressTracker, *nodes: str) -> None:
    for node in nodes:
        tracker.update("executing", {"node": node, "prompt_id": PID})
        tracker.update("executed", {"node": node, "prompt_id": PID})


def test_the_percentage_counts_finished_nodes_plus_the_current_nodes_steps() -> None:
    tracker = ProgressTracker(GRAPH)
    assert tracker.snapshot()["stage"] == "queued" and tracker.percent == 0
    tracker.update("execution_start", {"prompt_id": PID})
    run_nodes(tracker, "4", "5", "6", "7")
    assert tracker.percent == 25.0  # 4 of 16
    tracker.update("executing", {"node": "3", "prompt_id": PID})
    tracker.update("progress", {"value": 5, "max": 10, "node": "3", "prompt_id": PID})
    assert tracker.percent == 56.25  # (4 + 5) / 16
    assert tracker.snapshot()["percent"] == 56.2  # shown rounded to one decimal
    snapshot = tracker.snapshot()
    assert snapshot["stage"] == "sampling" and snapshot["node"] == "3"
    assert snapshot["message"] == "step 5 of 10 in KSampler (node 3)"
    run_nodes(tracker, "8")
    assert tracker.percent == 93.75  # the sampler finished when the next node started
    tracker.update("executing", {"node": None, "prompt_id": PID})
    assert tracker.snapshot() == {
        "percent": 100.0, "eta_seconds": 0, "node": None, "node_type": None, "stage": "finished",
        "message": "finished",
    }  # fmt: skip


def test_cached_nodes_count_as_done_and_the_percentage_never_goes_back() -> None:
    tracker = ProgressTracker(GRAPH)
    tracker.update("execution_cached", {"nodes": ["4", "5", "6", "7"], "prompt_id": PID})
    assert tracker.percent == 25.0
    seen = []
    for step in range(1, 11):
        tracker.update("progress", {"value": step, "max": 10, "node": "3", "prompt_id": PID})
        seen.append(tracker.percent)
    # A node reporting a larger maximum than its weight (a second sampler pass, a batch): the
    # weights grow, the shown number holds instead of dropping.
    tracker.update("executing", {"node": "8", "prompt_id": PID})
    tracker.update("progress", {"value": 1, "max": 50, "node": "8", "prompt_id": PID})
    seen.append(tracker.percent)
    assert seen == sorted(seen) and seen[-1] >= 87.5


def test_progress_state_snapshots_are_used_where_the_server_sends_them() -> None:
    tracker = ProgressTracker(GRAPH)
    nodes = {nid: {"value": 1.0, "max": 1.0, "state": "finished"} for nid in ("4", "5", "6", "7")}
    nodes["3"] = {"value": 2.0, "max": 10.0, "state": "running"}
    assert tracker.update("progress_state", {"prompt_id": PID, "nodes": nodes})
    assert tracker.percent == 37.5  # (4 + 2) / 16
    assert tracker.snapshot()["message"] == "step 2 of 10 in KSampler (node 3)"


def test_without_the_graph_the_percentage_waits_for_the_end_but_the_stage_moves() -> None:
    tracker = ProgressTracker({})  # a prompt adopted from an earlier attempt
    run_nodes(tracker, "4", "5")
    tracker.update("progress", {"value": 3, "max": 10, "node": "3", "prompt_id": PID})
    assert tracker.percent == 0 and tracker.snapshot()["message"] == "step 3 of 10 in node 3"
    tracker.update("executing", {"node": None, "prompt_id": PID})
    assert tracker.percent == 100


def test_an_eta_appears_once_a_few_steps_were_seen() -> None:
    clock = Clock()
    tracker = ProgressTracker(GRAPH, clock=clock)
    tracker.update("execution_start", {"prompt_id": PID})
    run_nodes(tracker, "4", "5", "6", "7")
    etas = []
    for step in range(1, 5):
        tracker.update("progress", {"value": step, "max": 10, "node": "3", "prompt_id": PID})
        etas.append(tracker.snapshot()["eta_seconds"])
        clock.now += 1.0  # one step a second: 1/16 of the work
    assert etas[:2] == [None, None]
    # The average since execution started: 7 of 16 units in 2 s leave 9 units, about 2.6 s;
    # then 8 of 16 in 3 s leave 3 s.
    assert etas[2:] == [3, 3]


def test_preview_frames_of_both_layouts_are_parsed() -> None:
    png = b"\x89PNG-bytes"
    assert parse_preview(b"\x00\x00\x00\x01\x00\x00\x00\x02" + png) == {
        "prompt_id": None, "node": None, "mime_type": "image/png", "image": png,
    }  # fmt: skip
    meta = b'{"prompt_id": "p1", "node_id": "3", "image_type": "image/jpeg"}'
    frame = b"\x00\x00\x00\x04" + len(meta).to_bytes(4, "big") + meta + b"jpeg"
    expected = {"prompt_id": "p1", "node": "3", "mime_type": "image/jpeg", "image": b"jpeg"}
    assert parse_preview(frame) == expected
    assert parse_preview(b"\x00\x00\x00\x03\x00\x00\x00\x05text!") is None  # type 3: text
    assert parse_preview(b"\x00\x00\x00\x04\xff\xff\xff\xff{}") is None  # a length past the end


async def test_a_job_reports_one_rising_percentage_from_queued_to_finished(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    backend = await make_backend(fake)
    ctx = RecordingContext()

    await backend.generate(make_request("[fake:duration=0.3]", steps=6), ctx)

    percents = [extra["percent"] for _, _, extra in ctx.progress]
    assert percents == sorted(percents), "never back to 0 at a new node"
    assert ctx.progress[0][2]["stage"] == "queued" and percents[0] == 0
    assert ctx.progress[-1][2] | {"eta_seconds": 0} == {
        "percent": 100.0, "eta_seconds": 0, "node": None, "node_type": None, "stage": "finished",
        "message": "finished",
    }  # fmt: skip
    messages = [extra["message"] for _, _, extra in ctx.progress]
    assert [f"step {n} of 6 in KSampler (node 3)" in messages for n in range(1, 7)] == [True] * 6
    sampling = [extra for _, _, extra in ctx.progress if extra["stage"] == "sampling"]
    assert any(extra["eta_seconds"] is not None for extra in sampling)
    assert all(value == extra["percent"] and maximum == 100 for value, maximum, extra in ctx.progress)
