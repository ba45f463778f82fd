"""Whether this host can take another job's files: the claim gate for a full or failing disk.

A worker whose output directory cannot take a file would otherwise claim job after job, render
each, fail to write it and spend the job's attempts in seconds: one full disk would fail the
fleet's whole queue. So the worker claims nothing while

- the directory's filesystem has less than ``output.min_free_mb`` free, or
- a job's files could not be written (``OutputUnwritable``: out of space, over quota, read-only,
  an I/O error; a backend's download spooled to the temporary directory counts too) and a small
  probe file has not been written and flushed in both directories since.

The job that met the failure goes back to pending without spending an attempt, so another
worker, or this one once the disk has room, takes it.
"""

from __future__ import annotations

import asyncio
import errno
import os
import tempfile
import time
from pathlib import Path

import structlog

log = structlog.get_logger("imagen.worker")

# What the waiting jobs' rows say; the log line carries the details.
HELD = "the worker cannot write images to its disk right now; the job waits until it can"
PROBE_BYTES = 64 * 1024
MIB = 1024 * 1024
# A disk that cannot take a file: out of space, over quota, read-only.
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def full(exc: BaseException) -> bool:
    """Whether ``exc`` is a disk that cannot take a file, as opposed to, say, a broken socket."""
    return isinstance(exc, OSError) and exc.errno in FULL_ERRNOS


class OutputDisk:
    def __init__(self, directory: Path, min_free_bytes: int, *, recheck_seconds: float = 1.0) -> None:
        self.directory = directory
        self.min_free_bytes = min_free_bytes
        self.recheck_seconds = recheck_seconds
        self.reason: str | None = None  # the public sentence while claims are held back
        self.problem: str | None = None  # the operator's: which directory, and what is wrong
        self._write_failed = False  # a job's write failed: a probe must pass first
        self._checked = float("-inf")

    def failed(self, error: str) -> None:
        """A job's files could not be written: hold claims until a probe file can be, tried no
        sooner than ``recheck_seconds`` from now (a probe fits where the job's image did not)."""
        self._write_failed = True
        self._checked = time.monotonic()
        self._hold(error)

    async def check(self) -> str | None:
        """The reason to claim nothing now, or None; looks at the disk at most once per
        ``recheck_seconds``, and no sooner than that after a failed write."""
        now = time.monotonic()
        if now - self._checked < self.recheck_seconds:
            return self.reason
        self._checked = now
        problem = await asyncio.to_thread(self._look)
        if problem is None:
            if self.reason is not None:
                log.info("output directory takes files again; claiming", directory=str(self.directory))
            self.reason = self.problem = None
            self._write_failed = False
        else:
            self._hold(problem)
        return self.reason

    def _hold(self, problem: str) -> None:
        if self.reason is None:
            log.error(
                "output directory cannot take a job's files; this worker claims nothing until it can",
                directory=str(self.directory), problem=problem,
            )  # fmt: skip
        self.reason = HELD
        self.problem = f"output directory {self.directory} takes no files: {problem}"

    def _look(self) -> str | None:
        try:
            free = free_bytes(self.directory)
        except OSError as exc:
            return exc.strerror or str(exc)
        if free < self.min_free_bytes:
            return f"{free // MIB} MiB free, below output.min_free_mb ({self.min_free_bytes // MIB})"
        if self._write_failed:
            # Backends spool large downloads to the temporary directory: it must take files too.
            return probe(self.directory) or probe(Path(tempfile.gettempdir()))
        return None


def existing(directory: Path) -> Path:
    """The directory, or its nearest ancestor that exists (before the worker has created it)."""
    path = directory
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(directory: Path) -> int:
    """Bytes an unprivileged writer may still use on the directory's filesystem."""
    stats = os.statvfs(existing(directory))
    return stats.f_bavail * stats.f_frsize


def probe(directory: Path) -> str | None:
    """Create, write and flush a small file where the images go: None when that worked, else
    the operating system's reason. A job's files meet the same errors."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".imagen-probe-", dir=directory)
        try:
            os.write(fd, bytes(PROBE_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(name)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None
