"""The embedded PostgreSQL's lifecycle: is it running, and stop it.

``connect.embedded_dsn`` starts the server on first use and leaves it running, so a worker and
a CLI in another terminal share one queue. These two answer "what is still running?" and
"stop it" without starting anything.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from imagen_worker.config import data_dir
from imagen_worker.errors import ConfigError


@dataclass(frozen=True)
class EmbeddedStatus:
    directory: Path
    initialised: bool
    pid: int | None  # the postmaster's pid while it runs
    socket_dir: str | None

    @property
    def running(self) -> bool:
        return self.pid is not None


def default_directory() -> Path:
    return data_dir() / "pgdata"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def status(directory: Path | None = None) -> EmbeddedStatus:
    """Read ``postmaster.pid``; a stale file left by a crash counts as not running."""
    path = directory or default_directory()
    pid_file = path / "postmaster.pid"
    pid: int | None = None
    socket_dir: str | None = None
    if pid_file.is_file():
        lines = pid_file.read_text(encoding="utf-8", errors="replace").splitlines()
        if lines and lines[0].strip().isdigit() and _alive(int(lines[0])):
            pid = int(lines[0])
            socket_dir = lines[4].strip() if len(lines) > 4 and lines[4].strip() else None
    return EmbeddedStatus(path, (path / "PG_VERSION").is_file(), pid, socket_dir)


def stop(directory: Path | None = None) -> bool:
    """Stop the server (fast shutdown: open sessions are ended); False when it was not running."""
    current = status(directory)
    if not current.running:
        return False
    # platformdirs warns about a missing XDG_RUNTIME_DIR when pgserver is imported on servers.
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    try:
        from pgserver._commands import pg_ctl  # type: ignore[attr-defined]
    except ImportError:
        raise ConfigError(
            "the embedded server is running but pgserver is not installed here to stop it"
        ) from None
    user = "pgserver" if os.geteuid() == 0 else None  # pgserver runs it as this user under root
    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=current.directory, user=user)
    return True
