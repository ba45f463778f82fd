"""The notify protocol against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from imagen_worker.observability.sdnotify import Notifier


def _receiver(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.setblocking(False)
    return sock


def _drain(sock: socket.socket) -> list[str]:
    messages = []
    while True:
        try:
            messages.append(sock.recv(4096).decode())
        except BlockingIOError:
            return messages


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    sock = _receiver(path)
    yield sock, path
    sock.close()


def test_path_socket_receives_each_message(systemd: tuple[socket.socket, str]) -> None:
    sock, path = systemd
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert (
        notifier.ready()
        and notifier.watchdog()
        and notifier.status("draining\n3 jobs")
        and notifier.stopping()
    )
    assert notifier.extend_timeout(1.5)
    notifier.close()
    assert _drain(sock) == [
        "READY=1",
        "WATCHDOG=1",
        "STATUS=draining 3 jobs",
        "STOPPING=1",
        "EXTEND_TIMEOUT_USEC=1500000",
    ]


def test_abstract_socket() -> None:
    name = f"imagen-test-{uuid.uuid4().hex}"
    sock = _receiver(b"\0" + name.encode())
    try:
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready()
        assert notifier.send("STATUS=ok", "WATCHDOG=1")
        assert _drain(sock) == ["READY=1", "STATUS=ok\nWATCHDOG=1"]
    finally:
        sock.close()


def test_watchdog_interval_is_half_the_timeout_for_this_pid() -> None:
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "30000000"}
    assert Notifier.from_env(env).watchdog_interval == 15.0
    assert Notifier.from_env({**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_interval == 15.0
    assert Notifier.from_env({**env, "WATCHDOG_PID": str(os.getpid() + 1)}).watchdog_interval is None
    assert Notifier.from_env({**env, "WATCHDOG_USEC": "0"}).watchdog_interval is None
    assert Notifier.from_env({**env, "WATCHDOG_USEC": "soon"}).watchdog_interval is None
    assert Notifier.from_env({"WATCHDOG_USEC": "30000000"}).watchdog_interval is None


def test_no_notify_socket_is_a_no_op() -> None:
    notifier = Notifier.from_env({})
    assert not notifier.enabled
    assert notifier.ready() is False and notifier.watchdog() is False and notifier.stopping() is False


def test_send_failure_never_raises_and_warns_once(tmp_path: Path) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    with capture_logs() as logs:
        assert notifier.ready() is False
        assert notifier.watchdog() is False
    assert [entry["event"] for entry in logs] == ["systemd notification failed"]
    unsupported = Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"})
    with capture_logs() as logs:
        assert unsupported.ready() is False and unsupported.ready() is False
    assert len(logs) == 1


async def test_keepalive_pings_while_healthy(systemd: tuple[socket.socket, str]) -> None:
    sock, path = systemd
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "20000"})  # ping every 10 ms
    healthy = True
    task = asyncio.create_task(notifier.keepalive(lambda: healthy))
    await asyncio.sleep(0.08)
    pings = _drain(sock)
    assert len(pings) >= 3 and set(pings) == {"WATCHDOG=1"}
    healthy = False
    await asyncio.sleep(0.03)
    _drain(sock)  # a ping may have been in flight when the flag flipped
    await asyncio.sleep(0.05)
    assert _drain(sock) == []
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_keepalive_returns_when_the_watchdog_is_off() -> None:
    await asyncio.wait_for(Notifier.from_env({"NOTIFY_SOCKET": "/run/x"}).keepalive(), timeout=1)
    await asyncio.wait_for(Notifier.from_env({}).keepalive(), timeout=1)
