"""Every output kept, the main one chosen on purpose, streamed within a cap, history cleaned up."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from typing import Any

import pytest

from imagen_worker.backends.comfyui import client
from imagen_worker.backends.comfyui.client import FileRef
from imagen_worker.backends.comfyui.history import execution_order, main_first
from imagen_worker.errors import TerminalError
from tests.backends.comfyui.conftest import BackendFactory
from tests.backends.comfyui.support import RecordingContext, make_request
from tests.backends.comfyui.test_comfyui_outages import until
from tests.contract.test_comfyui_contract import two_savers
from tests.fakes.comfyui import FakeComfyUI


def job_with(graph: dict[str, Any]) -> Any:
    return make_request(workflow={"graph": graph})


def nodes_of(result: Any) -> list[str]:
    return [output.origin["node_id"] for output in [result.image, *result.extra_outputs]]


async def test_the_last_saver_to_run_is_the_main_output_whatever_history_order_says(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    backend = await make_backend(fake)
    request = backend.check_request(job_with(two_savers()))
    result = await backend.generate(request, RecordingContext())

    entry_order = result.metadata["outputs"]
    assert nodes_of(result) == ["2", "2", "2", "9", "9", "9"], "Final (ran last) first, then Intermediate"
    assert [o["filename"] for o in entry_order[:3]] == sorted(o["filename"] for o in entry_order[:3])
    assert all(output.read().startswith(b"\x89PNG") for output in [result.image, *result.extra_outputs])


async def test_the_configured_output_by_title_wins_over_execution_order(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    backend = await make_backend(fake, output="Intermediate")
    result = await backend.generate(backend.check_request(job_with(two_savers())), RecordingContext())
    assert nodes_of(result) == ["9", "9", "9", "2", "2", "2"]


async def test_a_configured_output_that_is_not_in_the_graph_fails_in_one_sentence(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    backend = await make_backend(fake, output="Upscaled")
    with pytest.raises(
        TerminalError, match=r"the workflow has no node with the id or title 'Upscaled' \(output\)"
    ):
        await backend.generate(backend.check_request(job_with(two_savers())), RecordingContext())


async def test_our_history_entries_are_deleted_after_collection_unless_kept(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    cleaning = await make_backend(fake, lookahead=1)
    keeping = await make_backend(fake, keep_history=True)
    cleaned = await asyncio.gather(
        *(cleaning.generate(make_request(f"job {i}"), RecordingContext()) for i in range(2))
    )
    kept = await keeping.generate(make_request("another"), RecordingContext())
    deleted = {result.metadata["prompt_id"] for result in cleaned}

    # Off the job's path: the jobs returned before ComfyUI was asked to forget them, and
    # prompts that finished together are forgotten in one request.
    assert all(fake.history_entry(prompt_id) is not None for prompt_id in deleted)
    await until(lambda: all(fake.history_entry(prompt_id) is None for prompt_id in deleted))
    assert fake.history_entry(kept.metadata["prompt_id"]) is not None
    deletes = [set(call.body["delete"]) for call in fake.calls("POST", "/history")]
    assert deletes == [deleted]


async def test_closing_the_backend_sends_the_deletions_still_waiting(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    backend = await make_backend(fake)
    result = await backend.generate(make_request(), RecordingContext())
    await backend.aclose()

    assert fake.history_entry(result.metadata["prompt_id"]) is None


async def test_small_outputs_stay_in_memory_and_never_touch_the_spool(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    backend = await make_backend(fake)
    result = await backend.generate(backend.check_request(job_with(two_savers())), RecordingContext())

    outputs = [result.image, *result.extra_outputs]
    assert all(output.path is None and output.read().startswith(b"\x89PNG") for output in outputs)
    assert [o["sha256"] for o in result.metadata["outputs"]] == [
        hashlib.sha256(output.read()).hexdigest() for output in outputs
    ]
    assert backend._spool is None or not list(backend._spool.iterdir())


async def test_large_outputs_stream_to_temporary_files_within_max_output_bytes(
    fake: FakeComfyUI, make_backend: BackendFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client, "IN_MEMORY_BYTES", 0)
    backend = await make_backend(fake)
    result = await backend.generate(backend.check_request(job_with(two_savers())), RecordingContext())
    files = [output.path for output in [result.image, *result.extra_outputs]]
    assert all(path is not None and path.is_file() for path in files) and result.image.data == b""
    result.image.discard()
    assert result.image.path is not None and not result.image.path.exists()
    spool = files[1].parent if files[1] else None
    await backend.aclose()
    assert spool is not None and not spool.exists(), "closing the backend removes what is left"

    small = await make_backend(fake, max_output_bytes=1024)
    with pytest.raises(TerminalError, match=r"larger than backend \"gpu\"'s max_output_bytes \(1024 bytes\)"):
        await small.generate(small.check_request(job_with(two_savers(size=64))), RecordingContext())


async def test_n_binds_the_latent_batch_and_a_workflow_without_batch_size_refuses_n(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    backend = await make_backend(fake)
    request = backend.check_request(make_request(n=4))
    assert request.params["batch_size"] == 4
    result = await backend.generate(request, RecordingContext())
    assert len(result.extra_outputs) == 3

    with pytest.raises(TerminalError, match=r"^n 2 needs a batch: .* has no batch_size binding"):
        backend.check_request(dataclasses.replace(job_with(two_savers()), n=2))


def test_without_events_the_graph_orders_the_savers() -> None:
    graph = two_savers()
    assert execution_order(graph, []) == ["1", "7", "9", "2"], "by depth of links, then id"
    assert execution_order(graph, ["2", "9"]) == ["2", "9", "1", "7"], "events seen come first"
    files = [FileRef("9", "images", "i.png", "", "output"), FileRef("2", "images", "f.png", "", "output")]
    assert [ref.node_id for ref in main_first(files, graph, [], None)] == ["2", "9"]
    assert [ref.node_id for ref in main_first(files, graph, ["2", "9"], None)] == ["9", "2"]
