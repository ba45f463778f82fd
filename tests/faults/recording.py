"""A fake backend that records every execution, so a test can prove "exactly once".

``type: recording`` renders like the mock backend after ``latency_ms``, and appends one JSON
line to its ``ledger`` file when an execution starts and one when it ends (``ok``,
``cancelled``, ``error`` or ``unavailable``), with the job id, the attempt, the worker's pid and
wall-clock times. Appends of one short line are atomic, so any number of worker processes can
share one ledger.

For chaos runs it can also fail: ``fail_rate`` (retryable), the job parameter
``fail: terminal``, and an outage switch: while the file named by ``down_file`` exists, the
backend says it is unavailable, a running render stops with ``BackendUnavailable`` (as when a
GPU server dies mid-job) and new ones are refused the same way.

Worker subprocesses find the adapter through the ``imagen_worker.backends`` entry-point group,
like any third-party adapter: ``register(directory)`` writes the
distribution metadata that declares it, and ``subprocess_env`` puts it on ``PYTHONPATH``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

import structlog
from pydantic import BaseModel, ConfigDict, Field

from imagen_worker.backends.base import Backend, GenerateRequest, GenerateResult, JobContext, Output
from imagen_worker.backends.mock import render_png
from imagen_worker.errors import BackendUnavailable, RetryableError, TerminalError

ROOT = Path(__file__).resolve().parents[2]
ENTRY_POINT = "recording = tests.faults.recording:RecordingBackend"


class RecordingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str = "recording"
    ledger: Path
    latency_ms: float = Field(default=0.0, ge=0)
    capacity: int = Field(default=4, ge=1)
    fail_rate: float = Field(default=0.0, ge=0, le=1)
    down_file: Path | None = None


def attempt_of(ctx: JobContext) -> int | None:
    """The attempt this execution serves: the job on the worker's context, else the log context."""
    job = getattr(ctx, "job", None)
    attempts = getattr(job, "attempts", None)
    if isinstance(attempts, int):
        return attempts
    bound = structlog.contextvars.get_contextvars().get("attempt")
    return bound if isinstance(bound, int) else None


class RecordingBackend(Backend):
    type_name = "recording"

    def __init__(self, name: str, config: RecordingConfig) -> None:
        super().__init__(name)
        self.config = config
        self._random = random.Random()
        self._down = False
        self._watcher: asyncio.Task[None] | None = None

    @classmethod
    def from_config(cls, name: str, block: Mapping[str, Any]) -> Self:
        return cls(name, RecordingConfig.model_validate(dict(block)))

    @property
    def capacity(self) -> int:
        return self.config.capacity

    @property
    def unavailable_reason(self) -> str | None:
        return f'backend "{self.name}" is down (simulated outage)' if self._down else None

    async def start(self) -> None:
        if self.config.down_file is not None:
            self._watcher = asyncio.create_task(self._watch_outage(self.config.down_file))

    async def aclose(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher

    async def _watch_outage(self, path: Path) -> None:
        while True:
            down = path.exists()
            if down != self._down:
                self._down = down
                self.notify_change()
            await asyncio.sleep(0.1)

    def _check_up(self) -> None:
        if self.config.down_file is not None and self.config.down_file.exists():
            raise BackendUnavailable(f'backend "{self.name}" is down (simulated outage)')

    def _write(self, **entry: Any) -> None:
        line = json.dumps({"backend": self.name, "pid": os.getpid(), "t": time.time(), **entry}) + "\n"
        fd = os.open(self.config.ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    async def generate(self, request: GenerateRequest, ctx: JobContext) -> GenerateResult:
        key = {"job": str(request.job_id), "attempt": attempt_of(ctx)}
        self._write(event="start", **key)
        outcome = "error"
        try:
            steps = 10
            for step in range(1, steps + 1):
                self._check_up()
                await asyncio.sleep(self.config.latency_ms / 1000 / steps)
                ctx.report_progress(step, steps)
            self._check_up()
            if request.params.get("fail") == "terminal":
                raise TerminalError(f'backend "{self.name}": simulated bad request (fail=terminal)')
            if self._random.random() < self.config.fail_rate:
                raise RetryableError(f'backend "{self.name}": simulated failure, try again later')
            data = render_png(request.prompt, request.seed, 16, 16)
            outcome = "ok"
        except BackendUnavailable:
            outcome = "unavailable"
            raise
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            self._write(event="end", outcome=outcome, **key)
        return GenerateResult(image=Output(data=data, mime_type="image/png", name="recording.png"))


def register(directory: Path) -> Path:
    """Write the metadata that declares ``type: recording``; returns the directory for sys.path."""
    dist = directory / "imagen_fault_recorder-1.0.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: imagen-fault-recorder\nVersion: 1.0\n", encoding="utf-8"
    )
    (dist / "entry_points.txt").write_text(f"[imagen_worker.backends]\n{ENTRY_POINT}\n", encoding="utf-8")
    return directory


def subprocess_env(directory: Path) -> dict[str, str]:
    """Environment additions that let a worker subprocess load the recording adapter."""
    paths = [str(register(directory)), str(ROOT), os.environ.get("PYTHONPATH", "")]
    return {"PYTHONPATH": os.pathsep.join(p for p in paths if p)}
