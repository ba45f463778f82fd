"""ComfyUI answers the same way from the fake and from a real 0.3.64.

Each scenario is a fact the adapter relies on, exercised on the wire with workflows of nodes
that need no model weights: how a prompt is accepted or refused, which events reach our
socket and in what order, what history says after success, failure and interrupt, what a
queue delete does, and what ``/view`` serves.
"""

from __future__ import annotations

import asyncio
import io
import json
import struct
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import websockets
from PIL import Image

from imagen_worker.backends.comfyui import ComfyUIBackend
from imagen_worker.backends.comfyui.client import PREVIEW, ComfyUIClient
from imagen_worker.backends.comfyui.failures import DISK_FULL, ServerDiskFull
from imagen_worker.backends.comfyui.progress import ProgressTracker
from tests.backends.comfyui.support import RecordingContext, make_request
from tests.contract.conftest import ComfyPeer


class Session:
    """One client: a socket with a stable clientId, and every event it received, by prompt."""

    def __init__(self, peer: ComfyPeer, *, preview_metadata: bool = False) -> None:
        self.peer = peer
        self.preview_metadata = preview_metadata  # announce supports_preview_metadata first
        self.client_id = f"contract-{uuid.uuid4().hex[:8]}"
        self.http = httpx.AsyncClient(base_url=peer.url, timeout=30)
        self.events: list[dict[str, Any]] = []
        self._arrived = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Session:
        ws_url = self.peer.url.replace("http://", "ws://") + f"/ws?clientId={self.client_id}"
        self.ws = await websockets.connect(ws_url, max_size=2**26)
        if self.preview_metadata:
            flags = {"type": "feature_flags", "data": {"supports_preview_metadata": True}}
            await self.ws.send(json.dumps(flags))
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._reader is not None
        self._reader.cancel()
        await self.ws.close()
        await self.http.aclose()

    async def _read(self) -> None:
        async for frame in self.ws:
            if isinstance(frame, bytes):
                (kind,) = struct.unpack(">I", frame[:4])
                self.events.append({"type": "binary", "data": {"event_type": kind}, "raw": frame})
            else:
                self.events.append(json.loads(frame))
            self._arrived.set()

    async def submit(self, graph: dict[str, Any], *, client: bool = True) -> tuple[str, httpx.Response]:
        prompt_id = str(uuid.uuid4())
        body: dict[str, Any] = {"prompt": graph, "prompt_id": prompt_id}
        if client:
            body["client_id"] = self.client_id
        return prompt_id, await self.http.post("/prompt", json=body)

    def of(self, prompt_id: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("data", {}).get("prompt_id") == prompt_id]

    def types(self, prompt_id: str) -> list[str]:
        return [e["type"] for e in self.of(prompt_id) if e["type"] not in ("progress_state", "progress")]

    async def until(self, prompt_id: str, event: str, within: float = 60) -> dict[str, Any]:
        async with asyncio.timeout(within):
            while True:
                for e in self.of(prompt_id):
                    if e["type"] == event and (event != "executing" or e["data"]["node"] is None):
                        return e
                self._arrived.clear()
                await self._arrived.wait()

    async def finished(self, prompt_id: str, within: float = 60) -> dict[str, Any]:
        """The completion rule: ``executing`` with node null, then the history entry."""
        await self.until(prompt_id, "executing", within)
        entry: dict[str, Any] = (await self.http.get(f"/history/{prompt_id}")).json()[prompt_id]
        return entry

    async def queue(self) -> tuple[list[str], list[str]]:
        state = (await self.http.get("/queue")).json()
        return [r[1] for r in state["queue_running"]], [p[1] for p in state["queue_pending"]]


@pytest.fixture
async def session(comfy: ComfyPeer) -> AsyncIterator[Session]:
    async with Session(comfy) as opened:
        await asyncio.sleep(0.05)  # the connect-time status message
        yield opened


def _unique() -> int:
    return uuid.uuid4().int % 0xFFFFFF


def empty(width: int, height: int, *, batch: int = 1, color: int | None = None) -> dict[str, Any]:
    """EmptyImage's inputs; a fresh colour by default busts ComfyUI's node cache."""
    return {
        "width": width,
        "height": height,
        "batch_size": batch,
        "color": _unique() if color is None else color,
    }


def tiny(prefix: str = "contract/out", *, batch: int = 1, size: int = 64) -> dict[str, Any]:
    return {
        "1": {"class_type": "EmptyImage", "inputs": empty(size, size, batch=batch)},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def slow(prefix: str = "contract/slow") -> dict[str, Any]:
    """Seconds of work on a CPU ComfyUI; the fake is told to take as long (``ComfyPeer.slow``)."""
    graph: dict[str, Any] = {
        "1": {"class_type": "EmptyImage", "inputs": empty(1024, 1024, batch=4)},
        "99": {"class_type": "SaveImage", "inputs": {"images": ["14", 0], "filename_prefix": prefix}},
    }
    for index in range(10, 15):
        source = "1" if index == 10 else str(index - 1)
        graph[str(index)] = {
            "class_type": "ImageBlur",
            "inputs": {"image": [source, 0], "blur_radius": 20, "sigma": 5.0},
        }
    return graph


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


async def test_the_server_reports_its_version(session: Session) -> None:
    stats = (await session.http.get("/system_stats")).json()

    assert stats["system"]["comfyui_version"].startswith("0.3.")
    assert isinstance(stats["devices"], list)


async def test_the_socket_greets_with_status_and_our_sid(comfy: ComfyPeer) -> None:
    client_id = f"greet-{uuid.uuid4().hex[:6]}"
    async with websockets.connect(comfy.url.replace("http://", "ws://") + f"/ws?clientId={client_id}") as ws:
        first = json.loads(await asyncio.wait_for(ws.recv(), 10))

    assert first["type"] == "status"
    assert first["data"]["sid"] == client_id
    assert "queue_remaining" in first["data"]["status"]["exec_info"]


async def test_success_events_arrive_in_order_and_history_names_the_file(session: Session) -> None:
    prompt_id, answer = await session.submit(tiny(f"contract/{uuid.uuid4().hex[:6]}"))

    entry = await session.finished(prompt_id)

    assert answer.status_code == 200
    assert answer.json()["prompt_id"] == prompt_id
    assert answer.json()["node_errors"] == {}
    kinds = session.types(prompt_id)
    assert kinds[0] == "execution_start"
    assert kinds.index("executed") < kinds.index("execution_success") < len(kinds) - 1
    assert kinds[-1] == "executing"  # node null, after the history write
    assert entry["status"]["status_str"] == "success"
    assert entry["status"]["completed"] is True
    [image] = entry["outputs"]["2"]["images"]
    assert image["type"] == "output"
    view = await session.http.get("/view", params=image)
    assert view.headers["content-type"] == "image/png"
    assert _png_size(view.content) == (64, 64)


async def test_a_batch_of_four_saves_four_files(session: Session) -> None:
    prompt_id, _ = await session.submit(tiny(f"contract/{uuid.uuid4().hex[:6]}", batch=4))

    entry = await session.finished(prompt_id)

    images = entry["outputs"]["2"]["images"]
    assert len(images) == 4
    assert len({i["filename"] for i in images}) == 4


async def test_an_out_of_range_input_is_refused_with_node_errors_and_nothing_queued(session: Session) -> None:
    graph = tiny()
    graph["1"]["inputs"]["width"] = 0

    prompt_id, answer = await session.submit(graph)
    await asyncio.sleep(0.3)

    assert answer.status_code == 400
    body = answer.json()
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    [error] = body["node_errors"]["1"]["errors"]
    assert (error["type"], error["details"]) == ("value_smaller_than_min", "width")
    assert body["node_errors"]["1"]["class_type"] == "EmptyImage"
    assert session.of(prompt_id) == []
    assert (await session.http.get(f"/history/{prompt_id}")).json() == {}


async def test_an_unknown_node_class_is_an_invalid_prompt(session: Session) -> None:
    _, answer = await session.submit({"1": {"class_type": "NoSuchNode", "inputs": {}}})

    assert answer.status_code == 400
    assert answer.json()["error"]["type"] == "invalid_prompt"
    assert "NoSuchNode" in answer.json()["error"]["message"]


async def test_a_partially_valid_prompt_is_accepted_with_node_errors(session: Session) -> None:
    graph = tiny(f"contract/{uuid.uuid4().hex[:6]}")
    graph["3"] = {"class_type": "EmptyImage", "inputs": empty(8, 8, color=99999999999)}
    graph["4"] = {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "contract/x"}}

    prompt_id, answer = await session.submit(graph)
    entry = await session.finished(prompt_id)

    assert answer.status_code == 200
    assert answer.json()["node_errors"]["3"]["errors"][0]["type"] == "value_bigger_than_max"
    assert set(entry["outputs"]) == {"2"}


async def test_an_execution_error_is_reported_in_history(session: Session) -> None:
    prompt_id, answer = await session.submit(tiny("../../escape"))

    entry = await session.finished(prompt_id)

    assert answer.status_code == 200
    assert entry["status"]["status_str"] == "error"
    kind, data = entry["status"]["messages"][-1]
    assert kind == "execution_error"
    assert data["node_type"] == "SaveImage"
    assert "execution_error" in session.types(prompt_id)


async def test_a_targeted_interrupt_stops_only_our_running_prompt(session: Session, comfy: ComfyPeer) -> None:
    comfy.slow()
    prompt_id, _ = await session.submit(slow())
    await session.until(prompt_id, "execution_start", within=30)

    await session.http.post("/interrupt", json={"prompt_id": prompt_id})
    entry = await session.finished(prompt_id, within=60)

    assert entry["status"]["status_str"] == "error"
    assert entry["status"]["messages"][-1][0] == "execution_interrupted"
    assert "execution_interrupted" in session.types(prompt_id)
    assert "execution_success" not in session.types(prompt_id)


async def test_deleting_a_pending_prompt_is_silent(session: Session, comfy: ComfyPeer) -> None:
    comfy.slow()
    running, _ = await session.submit(slow())
    pending, _ = await session.submit(tiny())
    await session.until(running, "execution_start", within=30)

    deleted = await session.http.post("/queue", json={"delete": [pending]})
    _, still_pending = await session.queue()
    await session.http.post("/interrupt", json={"prompt_id": running})
    await session.finished(running, within=60)
    await asyncio.sleep(0.3)

    assert deleted.status_code == 200
    assert pending not in still_pending
    assert session.of(pending) == []
    assert (await session.http.get(f"/history/{pending}")).json() == {}


async def test_events_of_a_prompt_reach_only_its_client(session: Session, comfy: ComfyPeer) -> None:
    async with Session(comfy) as other:
        await asyncio.sleep(0.05)
        prompt_id, _ = await session.submit(tiny(f"contract/{uuid.uuid4().hex[:6]}"))
        await session.finished(prompt_id)
        await asyncio.sleep(0.2)

        assert other.of(prompt_id) == []
        assert any(e["type"] == "status" for e in other.events)


async def test_history_of_an_unknown_prompt_is_an_empty_object(session: Session) -> None:
    answer = await session.http.get(f"/history/{uuid.uuid4()}")

    assert (answer.status_code, answer.json()) == (200, {})


async def test_view_refuses_dot_dot_and_misses_with_empty_bodies(session: Session) -> None:
    escape = await session.http.get("/view", params={"filename": "../x.png", "type": "output"})
    missing = await session.http.get("/view", params={"filename": f"{uuid.uuid4()}.png", "type": "output"})

    assert (escape.status_code, escape.content) == (400, b"")
    assert (missing.status_code, missing.content) == (404, b"")


async def test_0_3_64_has_no_jobs_api_so_cancels_fall_back_to_delete_and_interrupt(session: Session) -> None:
    answer = await session.http.post(f"/api/jobs/{uuid.uuid4()}/cancel")

    assert answer.status_code in (404, 405)


async def test_a_prompt_from_another_client_is_visible_in_the_queue_and_announced_to_all(
    session: Session, comfy: ComfyPeer
) -> None:
    comfy.slow()
    async with Session(comfy) as frontend:
        foreign, _ = await frontend.submit(slow("contract/ui"))
        await frontend.until(foreign, "execution_start", within=30)
        running, _ = await session.queue()
        await frontend.http.post("/interrupt", json={"prompt_id": foreign})
        await frontend.finished(foreign, within=60)

    assert running == [foreign]
    assert session.of(foreign) == []
    assert any(e["type"] == "status" for e in session.events)


@pytest.mark.parametrize("preview_metadata", [False, True], ids=["plain", "metadata"])
async def test_save_image_websocket_sends_each_image_as_a_binary_frame(
    comfy: ComfyPeer, preview_metadata: bool
) -> None:
    """Binary frames: type 1 (u32 format 2 = PNG, then the PNG) after each ``progress``; to a
    client whose first frame asked for preview metadata, type 4 (u32 length, JSON naming the
    prompt and node, then the PNG) before it."""
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": empty(24, 16, batch=2)},
        "2": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["1", 0]}},
    }
    async with Session(comfy, preview_metadata=preview_metadata) as session:
        await asyncio.sleep(0.2)
        prompt_id, response = await session.submit(graph)
        assert response.status_code == 200, response.text
        entry = await session.finished(prompt_id)

    assert entry["status"]["status_str"] == "success" and entry["outputs"] == {}
    start = next(i for i, e in enumerate(session.events) if e.get("data", {}).get("prompt_id") == prompt_id)
    ours = [
        e
        for e in session.events[start:]
        if e["type"] == "binary" or (e["type"] == "progress" and e["data"]["prompt_id"] == prompt_id)
    ]
    if preview_metadata:
        assert [e["type"] for e in ours] == ["binary", "progress"] * 2
    else:
        assert [e["type"] for e in ours] == ["progress", "binary"] * 2
    assert [e["data"]["value"] for e in ours if e["type"] == "progress"] == [0, 1]
    for frame in (e["raw"] for e in ours if e["type"] == "binary"):
        kind, word = struct.unpack(">II", frame[:8])
        if preview_metadata:
            meta = json.loads(frame[8 : 8 + word])
            assert kind == 4 and meta == {
                "node_id": "2", "prompt_id": prompt_id, "display_node_id": "2", "parent_node_id": None,
                "real_node_id": "2", "image_type": "image/png",
            }  # fmt: skip
            image = frame[8 + word :]
        else:
            assert (kind, word) == (1, 2)
            image = frame[8:]
        assert _png_size(image) == (24, 16)


async def test_our_client_negotiates_preview_metadata_and_routes_frames_to_the_prompt(
    comfy: ComfyPeer,
) -> None:
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": empty(24, 16, batch=2)},
        "2": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["1", 0]}},
    }
    client = ComfyUIClient(comfy.url, headers={}, connect_timeout=5)
    await client.start()
    try:
        assert await client.wait_connected(5)
        prompt_id = str(uuid.uuid4())
        previews = []
        with client.watch(prompt_id) as watch:
            await client.submit(graph, prompt_id)
            while (event := await watch.get(30)) is not None:
                if event["type"] == PREVIEW:
                    previews.append(event["data"])
                if event["type"] == "executing" and event["data"]["node"] is None:
                    break
    finally:
        await client.aclose()

    assert [(p["prompt_id"], p["node"], p["mime_type"]) for p in previews] == [
        (prompt_id, "2", "image/png")
    ] * 2
    assert [_png_size(p["image"]) for p in previews] == [(24, 16)] * 2


async def test_a_socket_saver_batch_of_2_is_collected_as_the_jobs_two_images_every_time(
    comfy: ComfyPeer,
) -> None:
    """The adapter end to end: EmptyImage -> SaveImageWebsocket (batch 2) gives two PNG outputs;
    the same graph again reuses the cached EmptyImage but the saver runs again (its IS_CHANGED
    is the time), so the second job gets its images too."""
    color = _unique()
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": empty(24, 16, batch=2, color=color)},
        "2": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["1", 0]}},
    }
    block = {"type": "comfyui", "base_url": comfy.url, "workflow": "sd15", "poll_interval": 0.5,
             "connect_timeout": 5, "timeout": 60}  # fmt: skip
    backend = ComfyUIBackend.from_config("contract", block)
    results, images = [], []
    try:
        for _ in range(2):
            result = await backend.generate(make_request(workflow={"graph": graph}), RecordingContext())
            results.append(result)
            images.append([(o.origin, o.mime_type, o.read()) for o in [result.image, *result.extra_outputs]])
    finally:
        await backend.aclose()

    rgb = ((color >> 16) & 255, (color >> 8) & 255, color & 255)
    for outputs in images:
        assert [
            (origin["node_id"], origin["node_type"], origin["type"], mime) for origin, mime, _ in outputs
        ] == [("2", "SaveImageWebsocket", "websocket", "image/png")] * 2
        for _, _, data in outputs:
            with Image.open(io.BytesIO(data)) as image:
                assert image.size == (24, 16) and image.convert("RGB").getpixel((3, 3)) == rgb
    assert results[1].metadata["cached_nodes"] == ["1"], "EmptyImage cached, the saver ran again"


async def test_the_overall_percentage_rises_through_a_real_workflow(comfy: ComfyPeer) -> None:
    comfy.slow(1.0)
    graph = slow("contract/progress")
    client = ComfyUIClient(comfy.url, headers={}, connect_timeout=5)
    await client.start()
    tracker = ProgressTracker(graph)
    percents = []
    try:
        assert await client.wait_connected(5)
        prompt_id = str(uuid.uuid4())
        with client.watch(prompt_id) as watch:
            await client.submit(graph, prompt_id)
            while (event := await watch.get(60)) is not None:
                if tracker.update(event["type"], event["data"]):
                    percents.append(tracker.percent)
                if event["type"] == "executing" and event["data"]["node"] is None:
                    break
    finally:
        await client.aclose()

    assert percents == sorted(percents) and percents[-1] == 100.0
    # Seven one-weight nodes: each finished node is one seventh, whatever order events come in.
    assert len({round(p) for p in percents if 0 < p < 100}) >= 4


# --- input images: /upload/image and LoadImage ---------------------------------------------


def _png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    from tests.fakes.comfyui import tiny_png

    return tiny_png(rgb, width, height)


async def _upload(session: Session, data: bytes, name: str, subfolder: str, **fields: str) -> httpx.Response:
    form = {"subfolder": subfolder, "type": "input", **fields}
    return await session.http.post("/upload/image", files={"image": (name, data, "image/png")}, data=form)


def _load_invert_save(image: str) -> dict[str, Any]:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {
            "class_type": "SaveImage",
            "inputs": {"images": ["2", 0], "filename_prefix": "contract/inputs"},
        },
    }


def two_savers(batch: int = 3, size: int = 32) -> dict[str, Any]:
    """An "Intermediate" and a "Final" SaveImage over one batch; Final runs after an invert."""
    return {
        "1": {"class_type": "EmptyImage", "inputs": empty(size, size, batch=batch)},
        "7": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "2": {
            "class_type": "SaveImage",
            "inputs": {"images": ["7", 0], "filename_prefix": "contract/final"},
            "_meta": {"title": "Final"},
        },
        "9": {
            "class_type": "SaveImage",
            "inputs": {"images": ["1", 0], "filename_prefix": "contract/intermediate"},
            "_meta": {"title": "Intermediate"},
        },
    }


async def test_an_uploaded_image_loads_by_subfolder_and_name_at_its_own_size(session: Session) -> None:
    folder = f"imagen/contract-{uuid.uuid4().hex[:8]}"
    uploaded = await _upload(session, _png(40, 24, (200, 120, 40)), "init.png", folder, overwrite="true")
    answer = uploaded.json()

    prompt_id, response = await session.submit(_load_invert_save(f"{answer['subfolder']}/{answer['name']}"))
    entry = await session.finished(prompt_id)
    saved = entry["outputs"]["3"]["images"][0]
    view = await session.http.get("/view", params=saved)

    assert (uploaded.status_code, answer) == (200, {"name": "init.png", "subfolder": folder, "type": "input"})
    assert response.status_code == 200, response.text
    assert entry["status"]["status_str"] == "success"
    assert _png_size(view.content) == (40, 24)
    with Image.open(io.BytesIO(view.content)) as saved:
        assert saved.convert("RGB").getpixel((5, 5)) == (54, 135, 215)  # inverted in float32, truncated


async def test_a_name_clash_without_overwrite_gets_a_new_name_unless_the_bytes_match(
    session: Session,
) -> None:
    folder = f"imagen/contract-{uuid.uuid4().hex[:8]}"
    first, other = _png(8, 8, (1, 2, 3)), _png(8, 8, (4, 5, 6))

    names = [
        (await _upload(session, data, "x.png", folder, **extra)).json()["name"]
        for data, extra in [(first, {}), (first, {}), (other, {}), (other, {"overwrite": "true"})]
    ]

    assert names == ["x.png", "x.png", "x (1).png", "x.png"]


async def test_an_upload_outside_the_input_folder_is_a_bare_400(session: Session) -> None:
    escaping = await _upload(session, _png(8, 8, (1, 1, 1)), "x.png", "../outside")
    no_file = await session.http.post("/upload/image", data={"subfolder": "imagen"})

    assert (escaping.status_code, escaping.content) == (400, b"")
    assert (no_file.status_code, no_file.content) == (400, b"")


async def test_an_unknown_load_image_name_is_refused_as_an_invalid_image_file(session: Session) -> None:
    missing = f"imagen/contract-{uuid.uuid4().hex[:8]}/none.png"

    _, response = await session.submit(_load_invert_save(missing))
    body = response.json()

    assert response.status_code == 400
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    assert body["node_errors"]["1"]["class_type"] == "LoadImage"
    assert body["node_errors"]["1"]["errors"] == [
        {
            "type": "custom_validation_failed",
            "message": "Custom validation failed for node",
            "details": f"image - Invalid image file: {missing}",
            "extra_info": {"input_name": "image"},
        }
    ]


async def test_two_savers_with_batch_3_each_save_3_files_and_executed_events_name_them_in_run_order(
    session: Session,
) -> None:
    prompt_id, answer = await session.submit(two_savers())
    entry = await session.finished(prompt_id)

    assert answer.status_code == 200 and entry["status"]["status_str"] == "success"
    executed = [e["data"] for e in session.of(prompt_id) if e["type"] == "executed"]
    assert sorted(e["node"] for e in executed) == ["2", "9"], "one executed event per saver, none for others"
    assert set(entry["outputs"]) == {"2", "9"}
    for event in executed:
        # The event carries exactly the files history lists for that node: the event order can
        # stand in for history's, whose order comes from a set.
        assert event["output"] == entry["outputs"][event["node"]]
        assert len(event["output"]["images"]) == 3
        assert all(image["type"] == "output" for image in event["output"]["images"])
    starts = [e["data"]["node"] for e in session.of(prompt_id) if e["type"] == "executing"]
    assert starts.index("7") < starts.index("2"), "a saver runs after the node it takes its images from"
    assert [e["node"] for e in executed] == ["9", "2"], (
        "a ready saver runs first: Final, behind the invert, last"
    )


async def test_history_delete_forgets_the_entry_but_the_files_stay_on_the_server(session: Session) -> None:
    prompt_id, _ = await session.submit(tiny("contract/forget"))
    entry = await session.finished(prompt_id)
    image = entry["outputs"]["2"]["images"][0]

    deleted = await session.http.post("/history", json={"delete": [prompt_id]})
    after = await session.http.get(f"/history/{prompt_id}")
    view = await session.http.get("/view", params=image)

    assert deleted.status_code == 200
    assert after.json() == {}, "the entry is gone"
    assert view.status_code == 200 and view.content.startswith(b"\x89PNG"), (
        "0.3.64 has no API that deletes output files: /view still serves them"
    )


async def test_a_save_on_a_full_disk_is_an_oserror_of_the_saver_and_the_adapter_holds_the_job(
    full_disk_comfy: ComfyPeer,
) -> None:
    """What ``ServerDiskFull`` rests on: with its output directory on a full filesystem the
    saver's ``execution_error`` (socket and history alike) is ``OSError`` ``[Errno 28] No space
    left on device``, and the adapter gives the job back instead of failing it."""
    async with Session(full_disk_comfy) as session:
        prompt_id, answer = await session.submit(tiny("imagen/full/disk"))
        assert answer.status_code == 200, answer.text
        entry = await session.finished(prompt_id)
        sent = (await session.until(prompt_id, "execution_error"))["data"]
    recorded = next(data for kind, data in entry["status"]["messages"] if kind == "execution_error")
    for error in (sent, recorded):
        assert (error["node_id"], error["node_type"], error["exception_type"]) == (
            "2",
            "SaveImage",
            "OSError",
        )
        assert error["exception_message"] == "[Errno 28] No space left on device\n"

    graph = tiny("imagen/full/adapter")
    block = {"type": "comfyui", "base_url": full_disk_comfy.url, "workflow": "sd15", "poll_interval": 0.5,
             "connect_timeout": 5, "timeout": 60}  # fmt: skip
    backend = ComfyUIBackend.from_config("contract", block)
    try:
        with pytest.raises(ServerDiskFull) as caught:
            await backend.generate(make_request(workflow={"graph": graph}), RecordingContext())
        reason = backend.unavailable_reason
    finally:
        await backend.aclose()
    assert caught.value.message == (
        "ComfyUI cannot save images (No space left on device, in node 2 (SaveImage)); "
        "the job waits until it can"
    )
    assert reason == DISK_FULL
