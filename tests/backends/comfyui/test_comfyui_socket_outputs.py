"""SaveImageWebsocket images are outputs: collected from the socket whole, or the job runs again."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from imagen_worker.backends.comfyui.frames import SocketSaves
from imagen_worker.backends.comfyui.pool import first_prompt_id
from imagen_worker.errors import RetryableError, TerminalError
from tests.backends.comfyui.conftest import BackendFactory
from tests.backends.comfyui.support import RecordingContext, make_request
from tests.fakes.comfyui import FakeComfyUI, tiny_png


def socket_only(batch: int = 2, color: int = 9) -> dict[str, Any]:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 24, "height": 16, "batch_size": batch, "color": color},
        },
        "2": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["1", 0]}},
    }


def outputs_of(result: Any) -> list[Any]:
    return [result.image, *result.extra_outputs]


async def test_a_socket_only_workflow_yields_one_output_per_frame_and_no_previews(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    backend = await make_backend(fake)
    ctx = RecordingContext()

    result = await backend.generate(make_request(workflow={"graph": socket_only()}), ctx)

    images = outputs_of(result)
    assert [o.read() for o in images] == [tiny_png((0, 0, 9), 24, 16)] * 2
    assert [o.mime_type for o in images] == ["image/png"] * 2
    origins = result.metadata["outputs"]
    assert [(o["node_id"], o["node_type"], o["type"], o["filename"]) for o in origins] == [
        ("2", "SaveImageWebsocket", "websocket", "2_00001_.png"),
        ("2", "SaveImageWebsocket", "websocket", "2_00002_.png"),
    ]
    assert all(o["bytes"] == len(tiny_png((0, 0, 9), 24, 16)) and len(o["sha256"]) == 64 for o in origins)
    assert ctx.previews == [], "a saver's frames are the job's images, not previews"
    steps = [extra["message"] for _, _, extra in ctx.progress if extra["node"] == "2"]
    assert "step 1 of 2 in SaveImageWebsocket (node 2)" in steps, "its own progress still arrives"


async def test_plain_type_1_frames_are_attributed_through_the_executing_node(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    backend = await make_backend(fake)
    fake._preview_metadata.clear()  # the server did not read our feature flags: type 1 frames
    result = await backend.generate(
        make_request(workflow={"graph": socket_only(batch=3)}), RecordingContext()
    )
    assert [o.origin["node_id"] for o in outputs_of(result)] == ["2", "2", "2"]


async def test_a_socket_saver_running_last_is_the_main_output_and_output_can_name_another(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    graph = {
        **socket_only(batch=2),
        "3": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}},
        "2": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["3", 0]}, "_meta": {"title": "Live"}},
    }
    by_order = await make_backend(fake)
    by_title = await make_backend(fake, output="4")

    last = await by_order.generate(make_request(workflow={"graph": graph}), RecordingContext())
    named = await by_title.generate(make_request(workflow={"graph": graph}), RecordingContext())

    assert [o.origin["node_id"] for o in outputs_of(last)] == ["2", "2", "4", "4"], "behind the invert: last"
    assert [o.origin["node_id"] for o in outputs_of(named)] == ["4", "4", "2", "2"]


async def test_frames_count_against_max_output_bytes_and_leave_nothing_behind(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    backend = await make_backend(fake, max_output_bytes=8192)
    graph = socket_only(batch=2)
    graph["1"]["inputs"].update(width=1024, height=1024)  # 5.6 KB per PNG frame: the second is over

    with pytest.raises(TerminalError, match=r"larger than backend \"gpu\"'s max_output_bytes \(8192 bytes\)"):
        await backend.generate(make_request(workflow={"graph": graph}), RecordingContext())
    assert backend._spool is not None and not list(backend._spool.iterdir()), "no frame left in the spool"


async def test_a_socket_drop_while_the_saver_sends_fails_retryably_and_the_retry_runs_again(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    backend = await make_backend(fake)
    fake.frame_interval = 0.3
    ctx = RecordingContext()
    request = make_request(workflow={"graph": socket_only(batch=3)})
    job = asyncio.create_task(backend.generate(request, ctx))
    await fake.wait_until(lambda: len(fake.frames_sent) == 1)
    await fake.drop_sockets()  # the client reconnects at once; the frames sent meanwhile are lost

    with pytest.raises(RetryableError) as caught:
        await asyncio.wait_for(job, 10)

    first = first_prompt_id(request.job_id)
    assert caught.value.message == (
        f"ComfyUI finished prompt {first} but the websocket dropped while SaveImageWebsocket node 2 was "
        f"sending its images ({caught.value.message.split('(')[1].split(' received')[0]} received); ComfyUI "
        "sends those images only once, so the job runs again"
    )
    assert caught.value.message.split("(")[1].split(" received")[0].endswith(" of 3")
    assert backend._spool is not None and not list(backend._spool.iterdir()), "the partial frames are gone"

    fake.frame_interval = 0.0
    retry = await backend.generate(request, RecordingContext(first_claim=False))
    assert len(outputs_of(retry)) == 3 and retry.metadata["prompt_id"] != first, "submitted again"


async def test_an_earlier_prompt_still_running_is_withdrawn_not_adopted(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    """Its frames go to the earlier attempt's socket: following it could never yield them."""
    first = await make_backend(fake)
    second = await make_backend(fake)
    fake.frame_interval = 1.0
    ctx = RecordingContext(cancel_requested=False)
    request = make_request(workflow={"graph": socket_only(batch=3)})
    job = asyncio.create_task(first.generate(request, ctx))
    await fake.wait_until(lambda: len(fake.frames_sent) == 1)
    job.cancel()  # the worker lets go (lease lost): the prompt keeps running for the next owner
    with pytest.raises(asyncio.CancelledError):
        await job
    earlier = first_prompt_id(request.job_id)
    fake.frame_interval = 0.0

    result = await second.generate(request, RecordingContext(first_claim=False))

    assert len(outputs_of(result)) == 3 and result.metadata["prompt_id"] != earlier
    assert [i.prompt_id for i in fake.interrupts] == [earlier], "the earlier prompt was stopped"


SAVER_GRAPH = socket_only()


async def _saves(tmp_path: Any, events: list[tuple[str, dict[str, Any]]]) -> SocketSaves:
    saves = SocketSaves(SAVER_GRAPH, tmp_path, 1 << 20)
    for kind, data in events:
        await saves.feed(kind, data)
    return saves


def _frame(node: str = "2") -> tuple[str, dict[str, Any]]:
    return ("preview", {"prompt_id": "p", "node": node, "mime_type": "image/png", "image": b"png"})


async def test_a_saver_seen_from_its_start_to_the_next_node_with_every_frame_is_complete(
    tmp_path: Any,
) -> None:
    saves = await _saves(
        tmp_path,
        [("executing", {"node": "2"}), _frame(), ("progress", {"node": "2", "value": 0, "max": 2}),
         _frame(), ("progress", {"node": "2", "value": 1, "max": 2}), ("executing", {"node": None})],
    )  # fmt: skip
    assert saves.missing() is None and len(saves.frames) == 2


@pytest.mark.parametrize(
    ("events", "missing"),
    [
        (
            [("executing", {"node": "2"}), _frame(), ("progress", {"node": "2", "max": 2}),
             ("socket_connected", {}), ("executing", {"node": None})],
            "the websocket dropped while SaveImageWebsocket node 2 was sending its images (1 of 2 received)",
        ),
        (
            [("executing", {"node": "1"}), ("socket_connected", {}), ("executing", {"node": None})],
            "the websocket dropped while SaveImageWebsocket node 2 was sending its images (0 received)",
        ),
        (
            [("executing", {"node": "2"}), _frame(), ("progress", {"node": "2", "max": 2}),
             ("executing", {"node": None})],
            "only 1 of 2 images of SaveImageWebsocket node 2 arrived",
        ),
    ],
    ids=["reconnect-during-the-saver", "saver-run-unseen", "frame-missing"],
)  # fmt: skip
async def test_a_saver_not_seen_whole_is_missing_in_one_clause(
    tmp_path: Any, events: list[tuple[str, dict[str, Any]]], missing: str
) -> None:
    saves = await _saves(tmp_path, events)
    assert saves.missing() == missing
