"""The fake itself answers like ComfyUI 0.3.64, so the specs above mean something."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.fakes.comfyui import FakeComfyUI

GRAPH = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 7}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "p/x"}},
}


async def _messages(ws: ClientConnection, until: float = 0.3) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(until):
            async for frame in ws:
                if isinstance(frame, str):
                    seen.append(json.loads(frame))
    except TimeoutError:
        pass
    return seen


async def test_http_edges_match_the_recordings(fake: FakeComfyUI) -> None:
    async with httpx.AsyncClient(base_url=fake.url) as http:
        posted = await http.post("/api/prompt", json={"prompt": GRAPH})
        foreign = await http.post(
            "/prompt", json={"prompt": GRAPH}, headers={"Origin": "http://evil.example"}
        )
        broken = await http.post(
            "/prompt", content=b"{not json", headers={"Content-Type": "application/json"}
        )
        wrong_method = await http.delete("/queue")
        unknown = await http.get("/history/00000000-0000-0000-0000-000000000000")
        views = [
            await http.get("/view", params={"filename": name, "subfolder": sub})
            for name, sub in (("../x.png", ""), ("x.png", "../.."), ("nope.png", ""))
        ]
        await fake.wait_until(lambda: fake.history_entry(posted.json()["prompt_id"]) is not None)
        image = await http.get("/view", params={"filename": "x_00001_.png", "subfolder": "p"})

    assert posted.status_code == 200 and posted.json()["node_errors"] == {}
    assert (foreign.status_code, foreign.content) == (403, b"")
    assert (
        broken.status_code == 500
        and broken.text == "500 Internal Server Error\n\nServer got itself in trouble"
    )
    assert wrong_method.status_code == 405
    assert unknown.json() == {}
    assert [(v.status_code, v.content) for v in views] == [(400, b""), (403, b""), (404, b"")]
    assert image.headers["content-type"] == "image/png" and image.content.startswith(b"\x89PNG")


async def test_events_go_only_to_the_submitting_client_and_end_after_history(fake: FakeComfyUI) -> None:
    async with (
        connect(f"ws://127.0.0.1:{fake.port}/ws?clientId=A") as a,
        connect(f"ws://127.0.0.1:{fake.port}/ws?clientId=B") as b,
        httpx.AsyncClient(base_url=fake.url) as http,
    ):
        await http.post("/prompt", json={"prompt": GRAPH, "client_id": "A"})
        seen_a, seen_b = await asyncio.gather(_messages(a), _messages(b))

    types_a = [m["type"] for m in seen_a]
    assert types_a[0] == "status" and seen_a[0]["data"]["sid"] == "A"
    assert types_a.index("execution_success") < len(types_a) - 2
    assert types_a[-2:] == ["status", "executing"] and seen_a[-1]["data"]["node"] is None
    assert {m["type"] for m in seen_b} == {"status"}


async def test_a_reused_client_id_steals_the_routing(fake: FakeComfyUI) -> None:
    async with (
        connect(f"ws://127.0.0.1:{fake.port}/ws?clientId=C") as old,
        connect(f"ws://127.0.0.1:{fake.port}/ws?clientId=C") as new,
        httpx.AsyncClient(base_url=fake.url) as http,
    ):
        await asyncio.sleep(0.05)
        await http.post("/prompt", json={"prompt": GRAPH, "client_id": "C"})
        seen_old, seen_new = await asyncio.gather(_messages(old), _messages(new))

    assert [m["type"] for m in seen_old] == ["status"]  # only its own connect message
    assert "execution_success" in [m["type"] for m in seen_new]


async def test_a_prompt_without_client_id_sends_no_execution_events(fake: FakeComfyUI) -> None:
    async with (
        connect(f"ws://127.0.0.1:{fake.port}/ws?clientId=D") as ws,
        httpx.AsyncClient(base_url=fake.url) as http,
    ):
        answer = await http.post("/prompt", json={"prompt": GRAPH})
        seen = await _messages(ws)

    assert {m["type"] for m in seen} <= {"status", "progress_state"}
    assert fake.history_entry(answer.json()["prompt_id"])["status"]["status_str"] == "success"  # type: ignore[index]


async def test_0_3_64_has_no_jobs_api_and_a_newer_server_cancels_in_one_step(fake: FakeComfyUI) -> None:
    async with FakeComfyUI(jobs_api=True) as newer, httpx.AsyncClient() as http:
        fake.pause()
        newer.pause()
        old_id = (await http.post(f"{fake.url}/prompt", json={"prompt": GRAPH})).json()["prompt_id"]
        new_id = (await http.post(f"{newer.url}/prompt", json={"prompt": GRAPH})).json()["prompt_id"]

        old = await http.post(f"{fake.url}/api/jobs/{old_id}/cancel")
        new = await http.post(f"{newer.url}/api/jobs/{new_id}/cancel")
        again = await http.post(f"{newer.url}/api/jobs/{new_id}/cancel")

        assert (old.status_code, old.text) == (405, "405: Method Not Allowed")
        assert fake.pending_prompts == [old_id]
        assert (new.status_code, new.json(), again.json()) == (200, {"cancelled": True}, {"cancelled": False})
        assert newer.pending_prompts == []


async def test_a_stopped_fake_refuses_connections_and_comes_back_empty_on_the_same_port(
    fake: FakeComfyUI,
) -> None:
    async with httpx.AsyncClient(base_url=fake.url) as http:
        fake.pause()
        await http.post("/prompt", json={"prompt": GRAPH})
        port = fake.port

        await fake.stop()
        with pytest.raises(httpx.ConnectError):
            await http.get("/queue")
        await fake.start()

        assert fake.port == port
        assert (await http.get("/queue")).json() == {"queue_running": [], "queue_pending": []}


async def test_a_foreign_prompt_is_broadcast_as_a_queue_change_to_every_socket(fake: FakeComfyUI) -> None:
    async with connect(f"ws://127.0.0.1:{fake.port}/ws?clientId=worker") as ws:
        await _messages(ws, 0.1)  # the connect status
        foreign = await fake.submit_foreign(duration=0.05)
        seen = await _messages(ws, 0.3)

    assert [m["type"] for m in seen] == ["status"] * 3  # put, start, done: nothing of the prompt itself
    assert fake.history_entry(foreign) is not None
