"""A job's images: linked from an earlier attempt's upload, or produced and recorded now.

The upload record (``job_runs.result``) is written the moment the object is stored, so an
attempt that dies between the upload and the images row leaves the next attempt, on any host,
nothing to render: it links the stored object. With local storage nothing leaves this host,
so there is no record to write: the journal lets a retry here reuse the files. Local files of
a job that failed or was cancelled are removed; those of a job that will be retried stay as
the same-host cache.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import asyncpg

from imagen_worker import pipeline as pipeline_module
from imagen_worker.backends.base import JobContext
from imagen_worker.errors import RetryableError
from imagen_worker.pipeline import Artifact, Pipeline
from imagen_worker.queue.jobs import ImageRecord, Job, JobSpec, Queue, images_from_result
from imagen_worker.storage import outage

# The stages a job's time is told apart by, in order; "generate" (the backend's whole call)
# covers submit, execute and download, and "total" is claim + generate + write + upload + record.
STAGES = ("claim", "submit", "execute", "download", "generate", "write", "upload", "record")


def stage_milliseconds(timings: Mapping[str, float]) -> dict[str, float]:
    """Stage seconds as the milliseconds the images row's sidecar keeps (``timings_ms``)."""
    return {stage: round(timings[stage] * 1000, 3) for stage in STAGES if stage in timings}


async def produce(
    pipeline: Pipeline,
    queue: Queue,
    job: Job,
    spec: JobSpec,
    ctx: JobContext,
    *,
    claim_seconds: float = 0.0,
    rendered: Callable[[], None] = lambda: None,
    patience: outage.Patience | None = None,
) -> tuple[list[ImageRecord], Artifact | None]:
    """The images rows to write (main image first), and the artifact when this attempt made it."""
    if job.result is not None:
        rendered()
        return images_from_result(job.result), None
    artifact = await pipeline.run(
        job.id, spec, ctx, rendered=rendered, resume=job.ran_before, patience=patience
    )
    artifact.timings["claim"] = claim_seconds
    artifact.sidecar["timings_ms"] = stage_milliseconds(artifact.timings)
    records = artifact.image_records()
    if not artifact.uploaded:
        # Every file stayed on this host (local storage): another host could link nothing, and
        # a retry here finds the files through the journal. The completion is the one write.
        return records, artifact
    started = time.perf_counter()
    try:
        await queue.record_upload(job, records)
    except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
        # The object is stored and the local journal still knows it: a retry here uploads the
        # same file to the same key.
        raise RetryableError(
            "could not record the upload in the database", detail={"error": str(exc)}
        ) from None
    artifact.timings["record"] = time.perf_counter() - started
    return records, artifact


async def discard(output_directory: Path, job: Job) -> None:
    """Nothing stays on this host for a job that failed or was cancelled."""
    await asyncio.to_thread(pipeline_module.discard, output_directory, job.id)
