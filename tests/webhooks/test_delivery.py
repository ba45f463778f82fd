"""One attempt: which answers deliver, which are worth retrying, and which are final."""

from __future__ import annotations

import socket

import httpx
import pytest

from imagen_worker.webhooks.delivery import Rejected, Request, Retryable, Sender, _retry_after
from tests.webhooks.conftest import SECRET, Receiver

REQUEST = Request("d-1", "done", b'{"id":"d-1"}')


async def send(url: str, timeout: float = 2.0) -> None:
    async with httpx.AsyncClient() as client:
        await Sender(client, url, SECRET.encode(), timeout).send(REQUEST)


@pytest.mark.parametrize("status", [200, 201, 202, 204])
async def test_any_2xx_delivers(receiver: Receiver, status: int) -> None:
    receiver.script = [status]
    await send(receiver.url)
    assert len(receiver.requests) == 1


@pytest.mark.parametrize(
    ("status", "sentence"),
    [
        (500, "the receiver answered HTTP 500 Internal Server Error"),
        (502, "the receiver answered HTTP 502 Bad Gateway"),
        (503, "the receiver answered HTTP 503 Service Unavailable"),
        (429, "the receiver answered HTTP 429 Too Many Requests"),
    ],
)
async def test_5xx_and_429_are_worth_retrying(receiver: Receiver, status: int, sentence: str) -> None:
    receiver.script = [status]
    with pytest.raises(Retryable) as caught:
        await send(receiver.url)
    assert caught.value.message == sentence


@pytest.mark.parametrize(
    ("status", "sentence"),
    [
        (400, "the receiver answered HTTP 400 Bad Request"),
        (401, "the receiver answered HTTP 401 Unauthorized"),
        (404, "the receiver answered HTTP 404 Not Found"),
        (410, "the receiver answered HTTP 410 Gone"),
        (302, "the receiver answered HTTP 302 Found (redirects are not followed)"),
    ],
)
async def test_other_answers_are_final(receiver: Receiver, status: int, sentence: str) -> None:
    receiver.script = [status]
    with pytest.raises(Rejected) as caught:
        await send(receiver.url)
    assert caught.value.message == sentence


async def test_a_receiver_that_does_not_answer_in_time_is_retried(receiver: Receiver) -> None:
    receiver.delay = 1.0
    with pytest.raises(Retryable) as caught:
        await send(receiver.url, timeout=0.2)
    assert caught.value.message == "the receiver did not answer within 0.2 s"


async def test_a_refused_connection_is_retried() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(Retryable) as caught:
        await send(f"http://127.0.0.1:{port}/hooks")
    assert caught.value.message.startswith("could not reach the receiver: ")


def test_retry_after_in_seconds_or_as_a_date() -> None:
    assert _retry_after("7") == 7.0
    assert _retry_after(None) is None and _retry_after("soon") is None
    assert _retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past: no extra wait
