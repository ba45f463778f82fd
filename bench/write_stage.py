"""Write stage: a job's file work at the sizes people render, per output format.

The other benchmarks use 64x64 images, where decoding and encoding cost next to nothing; at
1024x1024 they are most of the write stage. This runs the pipeline in-process (the mock
backend at 0 ms, answering every job with one noisy picture saved the way ComfyUI saves, since
the mock's own gradient decodes several times faster than a render does; local storage,
default output settings but the format) and reports the ``write`` stage of each job's
timings: the encode into the output format with the metadata embedded, the image written and
fsync'ed with its directory, the thumbnail, the sidecar and the journal. Formats alternate
job by job (png, webp, jpeg, png, ...), so a drifting disk affects them alike; the first jobs
of each warm up and are not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import io
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from PIL import Image, ImageFilter

from bench.common import machine_info, print_table, scratch_directory, summary_ms, write_result
from imagen_worker.backends.base import GenerateRequest
from imagen_worker.backends.mock import MockBackend
from imagen_worker.config import OutputConfig
from imagen_worker.pipeline import Pipeline
from imagen_worker.queue.jobs import JobSpec
from imagen_worker.storage.local import LocalSink

NAME = "write_stage"
FORMATS: tuple[Literal["png", "webp", "jpeg"], ...] = ("png", "webp", "jpeg")
WARM_UP = 5


@functools.cache
def _picture(width: int, height: int) -> bytes:
    """A PNG that compresses like a render (fractal, noise, a blur), at ComfyUI's level 4."""
    fractal = Image.effect_mandelbrot((width, height), (-2.0, -1.5, 1.0, 1.5), 100).convert("RGB")
    noise = Image.effect_noise((width, height), 40).convert("RGB")
    picture = Image.blend(fractal, noise, 0.3).filter(ImageFilter.GaussianBlur(1.2))
    out = io.BytesIO()
    picture.save(out, format="PNG", compress_level=4)
    return out.getvalue()


class _Rendered(MockBackend):
    async def _render(self, request: GenerateRequest, index: int) -> bytes:
        return _picture(request.width, request.height)


class _Quiet:
    """The least JobContext: a job's first claim, nothing cancelled, progress dropped."""

    backend_ref: str | None = None
    first_claim = True
    cancel_requested = False

    async def set_backend_ref(self, ref: str) -> None:
        self.backend_ref = ref

    def report_progress(self, value: float, maximum: float, **extra: Any) -> None:
        return None

    def report_preview(self, data: bytes, mime_type: str) -> None:
        return None


async def measure(directory: Path, jobs: int, size: int) -> dict[str, list[float]]:
    backend = _Rendered.from_config("mock", {"type": "mock"})
    sink = LocalSink(directory, output_directory=directory)
    pipelines = {
        fmt: Pipeline({"mock": backend}, "mock", sink, OutputConfig(directory=directory, format=fmt))
        for fmt in FORMATS
    }
    spec = JobSpec(owner_user_id=uuid.uuid4(), prompt="a heron in the rain", width=size, height=size, steps=1)
    seconds: dict[str, list[float]] = {fmt: [] for fmt in FORMATS}
    for i in range(WARM_UP + jobs):
        for fmt, pipeline in pipelines.items():
            artifact = await pipeline.run(uuid.uuid4(), spec, _Quiet())
            if i >= WARM_UP:
                seconds[fmt].append(artifact.timings["write"])
    return seconds


async def run(jobs: int = 50, size: int = 1024) -> Mapping[str, Any]:
    info = await machine_info()
    with scratch_directory("imagen-bench-write-") as directory:
        seconds = await measure(directory, jobs, size)
    summaries = {fmt: summary_ms(values) for fmt, values in seconds.items()}
    print_table(
        f"Write stage of a {size}x{size} job, per output format ({jobs} jobs each, alternating)",
        ["format", "p50 ms", "p95 ms", "mean ms"],
        [(fmt, s["p50_ms"], s["p95_ms"], s["mean_ms"]) for fmt, s in summaries.items()],
    )
    result = {"machine": info, "parameters": {"jobs": jobs, "size": size}, "write_stage": summaries}
    write_result(NAME, result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args()
    asyncio.run(run(args.jobs, args.size))


if __name__ == "__main__":
    main()
