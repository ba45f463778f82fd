"""The systemd notify protocol (``sd_notify(3)``), without a dependency.

One datagram per message to the AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a path, or a Linux
abstract socket when it starts with ``@``). Under ``Type=notify`` systemd considers the unit
started only after ``READY=1``; with ``WatchdogSec=`` it kills and restarts the unit when
``WATCHDOG=1`` stops arriving, so the pings must come from the event loop that does the work:
a wedged loop then stops pinging. Outside systemd every method is a no-op, and a failing send
never raises: losing a notification must not take a healthy worker down.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Mapping

import structlog

from imagen_worker.errors import said

log = structlog.get_logger(__name__)


class Notifier:
    """A handle on ``$NOTIFY_SOCKET``; build it with ``Notifier.from_env()``."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address
        self._watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        self._warned = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """Read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` like ``sd_watchdog_enabled``.

        The watchdog counts as enabled only when ``WATCHDOG_USEC`` is a positive integer and
        ``WATCHDOG_PID`` is unset or names this process (a forked child must not ping for it).
        """
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        usec: int | None = None
        try:
            parsed = int(env.get("WATCHDOG_USEC", ""))
        except ValueError:
            parsed = 0
        pid = env.get("WATCHDOG_PID")
        if parsed > 0 and (not pid or pid == str(os.getpid())):
            usec = parsed
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between ``WATCHDOG=1`` pings (half the timeout, as systemd advises), or None."""
        if self._watchdog_usec is None or not self.enabled:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def ready(self) -> bool:
        return self.send("READY=1")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def status(self, text: str) -> bool:
        """Shown by ``systemctl status``; one line, so newlines become spaces."""
        return self.send("STATUS=" + " ".join(text.splitlines()))

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more start/stop time (``EXTEND_TIMEOUT_USEC``), e.g. while a long drain runs."""
        return self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; True when it went out."""
        if self.address is None:
            return False
        target = self._target()
        if target is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(assignments).encode(), target)
            return True
        except OSError as exc:
            self._warn_once("systemd notification failed", error=said(exc))
            self.close()
            return False

    def _target(self) -> str | bytes | None:
        address = self.address or ""
        if address.startswith("@"):
            return b"\0" + address[1:].encode()
        if address.startswith("/"):
            return address
        self._warn_once("NOTIFY_SOCKET has an unsupported address form; notifications disabled")
        return None

    def _warn_once(self, message: str, **fields: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning(message, notify_socket=self.address, **fields)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def keepalive(self, healthy: Callable[[], bool] | None = None) -> None:
        """Ping the watchdog every ``watchdog_interval`` until cancelled; returns at once if disabled.

        Run it as a task on the daemon's loop. ``healthy`` lets the daemon withhold pings when it
        knows it is stuck (say, no heartbeat written for several leases), so systemd restarts it.
        """
        interval = self.watchdog_interval
        if interval is None:
            return
        while True:
            if healthy is None or healthy():
                self.watchdog()
            await asyncio.sleep(interval)
