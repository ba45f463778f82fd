"""A job's images: linked from an earlier attempt's upload, or produced and recorded now.

The upload record (``job_runs.result``) is written the moment the object is stored, so an
attempt that dies between the upload and the images row leaves the next attempt, on any host,
nothing to render: it links the stored object. Local files of a job that failed or was
cancelled are removed; those of a job that will be retried stay as the same-host cache.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg

from imagen_worker import pipeline as pipeline_module
from imagen_worker.backends.base import JobContext
from imagen_worker.errors import RetryableError
from imagen_worker.pipeline import Artifact, Pipeline
from imagen_worker.queue.jobs import ImageRecord, Job, JobSpec, Queue, images_from_result


async def produce(
    pipeline: Pipeline, queue: Queue, job: Job, spec: JobSpec, ctx: JobContext
) -> tuple[list[ImageRecord], Artifact | None]:
    """The images rows to write (main image first), and the artifact when this attempt made it."""
    if job.result is not None:
        return images_from_result(job.result), None
    artifact = await pipeline.run(job.id, spec, ctx)
    records = artifact.image_records()
    try:
        await queue.record_upload(job, records)
    except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
        # The object is stored and the local journal still knows it: a retry here uploads the
        # same file to the same key.
        raise RetryableError(
            "could not record the upload in the database", detail={"error": str(exc)}
        ) from None
    return records, artifact


async def discard(output_directory: Path, job: Job) -> None:
    """Nothing stays on this host for a job that failed or was cancelled."""
    await asyncio.to_thread(pipeline_module.discard, output_directory, job.id)
