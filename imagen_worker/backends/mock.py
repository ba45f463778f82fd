"""The ``mock`` backend: a real PNG that depends only on prompt, seed and size.

It makes the whole product runnable without a GPU (``make demo``, tests, benchmarks), renders
a batch of ``n`` (image i from seed + i) and can simulate latency and failures. Its only job
param is ``mock_fail``; the pipeline refuses anything else before ``generate`` runs (see
``Backend.check_request``).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import struct
import time
import zlib
from collections.abc import Mapping
from typing import Any, Literal, Self

from pydantic import Field, ValidationError

from imagen_worker.backends.base import (
    Backend,
    GenerateRequest,
    GenerateResult,
    JobContext,
    Limits,
    Output,
    OutputDefaults,
    Params,
    config_error,
)
from imagen_worker.errors import RetryableError, TerminalError


class MockParams(Params):
    """What a job may ask of the mock: a simulated failure, for tests and demos."""

    mock_fail: Literal["terminal", "retryable"] | None = None


class MockConfig(Limits, OutputDefaults):
    type: Literal["mock"] = "mock"
    latency_ms: float = Field(default=0.0, ge=0)
    fail_rate: float = Field(default=0.0, ge=0, le=1)
    capacity: int = Field(default=4, ge=1, le=1024)


INLINE_PIXELS = 128 * 128


def render_png(prompt: str, seed: int, width: int, height: int) -> bytes:
    """A deterministic gradient PNG; identical inputs give identical bytes."""
    digest = hashlib.sha256(f"{prompt}\0{seed}\0{width}x{height}".encode()).digest()
    r0, g0, b0, dr, dg, _db = digest[:6]
    rows = []
    for y in range(height):
        shade = y * 255 // max(height - 1, 1)
        pixel = bytes(((r0 + shade * dr // 255) % 256, (g0 + shade * dg // 255) % 256, (b0 + shade) % 256))
        rows.append(b"\x00" + pixel * width)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"".join(rows), 1))
        + chunk(b"IEND", b"")
    )


class MockBackend(Backend):
    type_name = "mock"
    params_type = MockParams

    def __init__(self, name: str, config: MockConfig) -> None:
        super().__init__(name)
        self.config = config
        self._random = random.Random()

    @classmethod
    def from_config(cls, name: str, block: Mapping[str, Any]) -> Self:
        try:
            return cls(name, MockConfig.model_validate(dict(block)))
        except ValidationError as exc:
            raise config_error(name, exc, MockConfig) from None

    @property
    def capacity(self) -> int:
        return self.config.capacity

    @property
    def limits(self) -> Limits:
        return self.config

    @property
    def output_defaults(self) -> OutputDefaults:
        return self.config.defaults()

    async def _render(self, request: GenerateRequest, index: int) -> bytes:
        """Image ``index`` of the batch; a small one inline (a thread hop costs more than the
        render: about 50 us for 64x64), a large one in a thread so heartbeats go on."""
        args = (request.prompt, (request.seed + index) % 2**32, request.width, request.height)
        if request.width * request.height <= INLINE_PIXELS:
            return render_png(*args)
        return await asyncio.to_thread(render_png, *args)

    async def generate(self, request: GenerateRequest, ctx: JobContext) -> GenerateResult:
        started = time.perf_counter()
        steps = request.steps or 4
        per_step = self.config.latency_ms / 1000 / steps
        for step in range(1, steps + 1):
            if per_step:
                await asyncio.sleep(per_step)
            # The shape the ComfyUI adapter reports, so a web page needs one code path.
            last = step == steps
            ctx.report_progress(
                step, steps, percent=round(100 * step / steps, 1), node=None,
                stage="finished" if last else "sampling", eta_seconds=round(per_step * (steps - step)),
                message="finished" if last else f"step {step} of {steps}",
            )  # fmt: skip
        forced = request.params.get("mock_fail")
        if forced == "terminal":
            raise TerminalError(f'backend "{self.name}": simulated bad request (mock_fail=terminal)')
        if forced == "retryable" or self._random.random() < self.config.fail_rate:
            raise RetryableError(f'backend "{self.name}": simulated outage, try again later')
        # Image i of a batch is rendered from seed + i, as samplers number a latent batch.
        outputs = [
            Output(data=await self._render(request, i), mime_type="image/png", name=f"mock-{i}.png")
            for i in range(request.n)
        ]
        return GenerateResult(
            image=outputs[0],
            metadata={"renderer": "mock-gradient"},
            model="mock-gradient-v1",
            timings={"execute": time.perf_counter() - started},
            extra_outputs=outputs[1:],
        )
