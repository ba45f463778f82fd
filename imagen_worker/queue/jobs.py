"""The job state machine, and nothing else.

    pending --claim--> running --complete--> done
                         |  \\--fail--------> failed
                         |   \\--retry-------> pending (run_at = now + backoff)
                         |    \\--outage------> pending (attempt given back, outage_requeues + 1)
                         |     \\--cancel-----> cancelled (only with cancel_requested)
                         \\--release / lease expiry--> pending
    pending --cancel requested--> cancelled      failed|cancelled --retry (operator)--> pending

Every transition out of ``running`` is fenced on (id, worker_id, attempts, status): when it
matches no row, another worker owns the job now, ``LeaseLost`` is raised and nothing is
written. The statements live in ``queries.sql``.
"""

from __future__ import annotations

import enum
import hashlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, TypeAlias
from uuid import UUID

import asyncpg

from imagen_worker.errors import (
    ConfigError,
    JobError,
    LeaseLost,
    Outage,
    TerminalError,
    public_message,
)
from imagen_worker.queries import sql

Executor: TypeAlias = asyncpg.Pool | asyncpg.Connection
JobKey: TypeAlias = tuple[UUID, int]
"""(job id, attempt): one execution. Running work is keyed by it, never by the bare id."""


@dataclass(frozen=True)
class JobSpec:
    """What a client asks for; every field maps to a column the web UI may also write."""

    owner_user_id: UUID
    prompt: str
    negative_prompt: str | None = None
    backend: str | None = None
    style: str | None = None
    width: int = 1024
    height: int = 1024
    steps: int | None = None
    seed: int | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    priority: int = 0
    run_at: datetime | None = None
    max_attempts: int = 3
    dedupe_key: str | None = None
    n: int = 1  # images in the batch (jobs.n)
    format: str | None = None  # png, webp or jpeg (jobs.format); None: the worker's output.format
    quality: int | None = None  # 1..100 for webp and jpeg (jobs.quality)
    # Operator-only (``imagen submit --workflow``): ``authenticated`` cannot write the column.
    workflow: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Job:
    """A claimed row. ``attempts`` is the fence value for every later transition."""

    id: UUID
    owner_user_id: UUID
    prompt: str
    negative_prompt: str | None
    backend: str | None
    style: str | None
    width: int
    height: int
    steps: int | None
    seed: int | None
    params: Mapping[str, Any]
    attempts: int
    max_attempts: int
    backend_ref: str | None
    cancel_requested: bool
    created_at: datetime
    waited_seconds: float
    workflow: Mapping[str, Any] | None = None
    outage_requeues: int = 0
    n: int = 1
    format: str | None = None
    quality: int | None = None
    # The upload an earlier attempt recorded (``ImageRecord.as_result``): link it, render nothing.
    result: Mapping[str, Any] | None = None
    # False when this is the job's first claim ever: no earlier attempt left files to reuse.
    ran_before: bool = True

    @classmethod
    def from_record(cls, row: Mapping[str, Any]) -> Job:
        return cls(**{name: row[name] for name in cls.__dataclass_fields__ if name in row})

    @property
    def key(self) -> JobKey:
        return self.id, self.attempts


class Outcome(enum.StrEnum):
    """How an attempt that hit an error ended."""

    RETRIED = "retried"
    REQUEUED = "requeued"
    FAILED = "failed"


@dataclass(frozen=True)
class Unserved:
    """A backend pending jobs name that no live worker serves; ``seconds`` None = never seen."""

    backend: str
    seconds: float | None

    def orphaned(self, after: float) -> bool:
        return self.seconds is None or self.seconds >= after


@dataclass(frozen=True)
class Renewal:
    """One heartbeat answer for a (job, attempt) this worker runs."""

    renewed: bool
    ours: bool
    cancel_requested: bool


@dataclass(frozen=True)
class ImageRecord:
    """The ``imagen.images`` row written together with the job's completion."""

    storage_path: str
    mime_type: str
    bytes: int
    sha256: str
    backend: str
    seed: int
    latency_ms: int
    sidecar: Mapping[str, Any]
    model: str | None = None
    cost_usd_estimate: float | None = None
    width: int | None = None  # read from the file, never copied from the request
    height: int | None = None
    # Host-side facts (local path, backend instance and ids): imagen.image_internals only.
    internals: Mapping[str, Any] = field(default_factory=dict)
    index: int = 0  # place in the job's batch; 0 is the main image (jobs.image_id)
    thumbnail_path: str | None = None  # Storage key of the small WebP beside it

    def as_result(self) -> dict[str, Any]:
        """The upload record kept in ``job_runs.result`` until the job is done."""
        return {**asdict(self), "sidecar": dict(self.sidecar), "internals": dict(self.internals)}

    @classmethod
    def from_result(cls, result: Mapping[str, Any]) -> ImageRecord:
        return cls(**{name: result[name] for name in cls.__dataclass_fields__ if name in result})


def batch_result(images: Sequence[ImageRecord]) -> dict[str, Any]:
    """A job's upload record: every image of the batch, main image first."""
    return {"images": [image.as_result() for image in images]}


def images_from_result(result: Mapping[str, Any]) -> list[ImageRecord]:
    """The images an upload record holds (a record written before batches held one image)."""
    entries = result.get("images")
    if isinstance(entries, list):
        return [ImageRecord.from_result(entry) for entry in entries]
    return [ImageRecord.from_result(result)]


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def backoff_seconds(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with full-range jitter in [d/2, d], capped (pg-boss's formula)."""
    delay: float = min(cap, base * 2 ** max(attempt - 1, 0))
    return delay * random.uniform(0.5, 1.0)


class Queue:
    """The queue as seen by one worker process (``worker_id``) or by a client (no id)."""

    def __init__(self, db: Executor, worker_id: UUID | None = None) -> None:
        self.db = db
        self.worker_id = worker_id

    # --- clients -------------------------------------------------------------------

    async def enqueue(self, spec: JobSpec) -> tuple[UUID, bool]:
        """Insert a job; with a live duplicate ``dedupe_key`` return that job instead."""
        args = (
            spec.owner_user_id, spec.prompt, spec.negative_prompt, spec.backend, spec.style,
            spec.width, spec.height, spec.steps, spec.seed, dict(spec.params), spec.priority,
            spec.run_at, spec.max_attempts, spec.dedupe_key, spec.workflow, spec.n, spec.format,
            spec.quality,
        )  # fmt: skip
        for _ in range(3):
            new_id = await self.db.fetchval(sql("enqueue"), *args)
            if new_id is not None:
                return new_id, True
            existing = await self.db.fetchval(sql("find_live_dedupe"), spec.owner_user_id, spec.dedupe_key)
            if existing is not None:
                return existing, False
        raise RuntimeError(f"dedupe_key {spec.dedupe_key!r} kept changing state; try again")

    async def request_cancel(self, job_id: UUID) -> str | None:
        """Cancel: pending jobs end at once, running ones are told to stop. None = not live."""
        status: str | None = await self.db.fetchval(sql("request_cancel"), job_id)
        return status

    async def retry(self, job_id: UUID) -> bool:
        """Put a failed or cancelled job back in the queue with a fresh set of attempts."""
        try:
            return await self.db.fetchrow(sql("retry_job"), job_id) is not None
        except asyncpg.UniqueViolationError:
            raise ConfigError(
                f"job {job_id} cannot be retried: another live job of the same owner holds its dedupe_key"
            ) from None

    async def get(self, job_id: UUID) -> asyncpg.Record | None:
        return await self.db.fetchrow(sql("get_job"), job_id)

    async def recent(self, status: str | None = None, limit: int = 20) -> list[asyncpg.Record]:
        rows: list[asyncpg.Record] = await self.db.fetch(sql("list_jobs"), status, limit)
        return rows

    async def seconds_until_next_run(self) -> float | None:
        value: float | None = await self.db.fetchval(sql("next_run_at"))
        return value

    # --- workers ---------------------------------------------------------------------

    @property
    def _me(self) -> UUID:
        if self.worker_id is None:
            raise RuntimeError("this Queue has no worker id")
        return self.worker_id

    async def register(
        self,
        hostname: str,
        pid: int,
        backends: Sequence[str],
        ttl: float,
        default_backend: str | None = None,
        *,
        version: str | None = None,
        draining: bool = False,
        unavailable: Mapping[str, str] | None = None,
    ) -> None:
        await self.db.execute(
            sql("register_worker"), self._me, hostname, pid, list(backends), default_backend, ttl,
            version, draining, dict(unavailable or {}),
        )  # fmt: skip

    async def set_unavailable(self, unavailable: Mapping[str, str]) -> None:
        """The backends this worker takes no work for now, each with why (``imagen workers``)."""
        await self.db.execute(sql("worker_unavailable"), self._me, dict(unavailable))

    async def workers(self) -> list[asyncpg.Record]:
        """The fleet registry as ``imagen workers`` shows it (``fleet_workers``)."""
        return list(await self.db.fetch(sql("fleet_workers")))

    async def unregister(self) -> None:
        await self.db.execute(sql("unregister_worker"), self._me)

    async def claim(
        self,
        backend: str,
        *,
        is_default: bool,
        limit: int,
        lease_seconds: float,
        orphans: Sequence[str] = (),
        orphan_after: float = 0.0,
        held: Sequence[UUID] = (),
        max_running_per_owner: int | None = None,
    ) -> list[Job]:
        """Claim up to ``limit`` jobs for ``backend``.

        ``orphans`` are backends nobody has served for ``orphan_after`` seconds: their jobs that
        waited that long are taken so they fail in words. ``held`` are the jobs this worker
        still runs or is stopping; their expired leases are never re-taken here. Owners take
        turns; ``max_running_per_owner`` caps one owner's running jobs across the fleet.
        """
        if limit <= 0:
            return []
        args = (
            self._me, backend, is_default, list(orphans), limit, float(lease_seconds), float(orphan_after),
            list(held), max_running_per_owner,
        )  # fmt: skip
        if max_running_per_owner is None:
            rows = await self.db.fetch(sql("claim"), *args)
        else:
            # The cap counts running rows, and two claims at the same moment would each count
            # before the other committed: under the cap, claims go one at a time, each in a
            # snapshot taken after the one before committed (a statement's own, read committed).
            async with self._connection() as conn, conn.transaction():
                await conn.execute(sql("claim_one_at_a_time"))
                rows = await conn.fetch(sql("claim"), *args)
        return [Job.from_record(row) for row in rows]

    async def unserved_backends(self) -> list[Unserved]:
        """Backends named by pending jobs that no live worker serves right now."""
        rows = await self.db.fetch(sql("unserved_backends"))
        return [Unserved(row["backend"], row["unserved_seconds"]) for row in rows]

    async def orphan_backends(self, after: float = 0.0) -> list[str]:
        """Backends nobody has served for ``after`` seconds (the claim's ``orphans``)."""
        return [u.backend for u in await self.unserved_backends() if u.orphaned(after)]

    async def mark_waiting(
        self, backend: str, progress: Mapping[str, Any], *, with_default: bool = False, limit: int = 100
    ) -> int:
        """Write why pending jobs of ``backend`` wait into their ``progress`` (bounded, idempotent)."""
        result = await self.db.execute(sql("mark_waiting"), backend, with_default, dict(progress), limit)
        return int(result.rsplit(" ", 1)[-1])

    async def clear_waiting(
        self, backend: str, reason: str, *, with_default: bool = False, limit: int = 1000
    ) -> int:
        result = await self.db.execute(sql("clear_waiting"), backend, with_default, reason, limit)
        return int(result.rsplit(" ", 1)[-1])

    async def heartbeat(self, keys: Sequence[JobKey], lease_seconds: float) -> dict[JobKey, Renewal]:
        """Renew the leases of ``keys`` in one statement, skipping rows others hold locked."""
        if not keys:
            return {}
        rows = await self.db.fetch(sql("heartbeat"), self._me, float(lease_seconds), *_columns(keys))
        return {
            (row["id"], row["attempts"]): Renewal(row["renewed"], row["ours"], row["cancel_requested"])
            for row in rows
        }

    async def cancel_requested(self, keys: Sequence[JobKey]) -> set[JobKey]:
        """Which of ``keys`` really have ``cancel_requested`` on their row (control messages are hints)."""
        if not keys:
            return set()
        rows = await self.db.fetch(sql("cancel_requested"), self._me, *_columns(keys))
        return {(row["id"], row["attempts"]) for row in rows}

    async def requeue_expired(self) -> int:
        count: int = await self.db.fetchval(sql("requeue_expired"))
        return count

    async def release(self, keys: Sequence[JobKey]) -> int:
        """Give unfinished (job, attempt)s back to pending without spending the attempt."""
        if not keys:
            return 0
        row = await self.db.fetchrow(sql("release"), self._me, *_columns(keys))
        return int(row["released"]) if row else 0

    async def _fenced(self, db: Executor, name: str, job: Job, *args: Any) -> None:
        result = await db.execute(sql(name), job.id, self._me, job.attempts, *args)
        if result.endswith(" 0"):
            raise LeaseLost(f"job {job.id}: lease lost before {name}")

    async def set_backend_ref(self, job: Job, ref: str) -> None:
        await self._fenced(self.db, "set_backend_ref", job, ref)

    async def set_progress(self, job: Job, progress: Mapping[str, Any]) -> None:
        await self._fenced(self.db, "set_progress", job, dict(progress))

    async def record_upload(self, job: Job, images: ImageRecord | Sequence[ImageRecord]) -> None:
        """Remember the stored objects as soon as they are uploaded: any later attempt links them."""
        batch = [images] if isinstance(images, ImageRecord) else list(images)
        await self._fenced(self.db, "record_upload", job, batch_result(batch))

    async def complete(self, job: Job, images: ImageRecord | Sequence[ImageRecord]) -> UUID:
        """Insert the image rows and mark the job done, atomically: never one without the other.

        Returns the first image's id (``jobs.image_id``).
        """
        batch = [images] if isinstance(images, ImageRecord) else list(images)
        ids: list[UUID] = []
        async with self._connection() as conn, conn.transaction():
            for image in batch:
                try:
                    ids.append(await conn.fetchval(
                        sql("insert_image"),
                        job.owner_user_id, job.id, job.prompt, prompt_hash(job.prompt), image.backend,
                        image.model, image.seed, job.steps, image.width, image.height, image.latency_ms,
                        image.cost_usd_estimate, image.storage_path, image.mime_type, image.bytes,
                        image.sha256, dict(image.sidecar), dict(image.internals), image.index,
                        image.thumbnail_path,
                    ))  # fmt: skip
                except asyncpg.UniqueViolationError as exc:
                    raise _duplicate_image(job, image, exc) from None
            await self._fenced(conn, "complete", job, ids[0], batch[0].seed)
        return ids[0]

    async def complete_many(self, items: Sequence[tuple[Job, ImageRecord]]) -> list[Completion]:
        """Several completions in one statement and one commit, each job fenced on its own.

        The jobs go as one JSON array; each is fenced on (id, worker, attempt, running) under a
        row lock. A job that is no longer ours, or whose images row conflicts with an existing
        one, is reported (``Completion``) and left untouched; the others are recorded all the
        same. (The statement keeps its images INSERT within the first 1,024 characters, so
        ``pg_stat_activity`` shows it.)
        """
        payload = [_completion_row(job, image, position) for position, (job, image) in enumerate(items)]
        rows = await self.db.fetch(sql("complete_batch"), self._me, payload, len(payload))
        by_key = {(row["job_id"], row["attempt"]): Completion(row["fenced"], row["image_id"]) for row in rows}
        return [by_key.get(job.key, Completion(False, None)) for job, _ in items]

    async def fail(self, job: Job, message: str, detail: Mapping[str, Any] | None = None) -> None:
        """End the job failed: its owner reads one clean sentence, the operator everything."""
        public = public_message(message)
        record = {**(detail or {}), "message": message}
        await self._fenced(self.db, "fail", job, public, record)

    async def cancelled(self, job: Job, message: str = "cancelled by its owner") -> None:
        await self._fenced(self.db, "mark_cancelled", job, message)

    async def record_error(
        self, job: Job, error: JobError, *, base: float, cap: float, max_outage_requeues: int = 0
    ) -> Outcome:
        """Decide what an error means for the job and write it.

        An outage (the backend down, this host's disk full) gives the attempt back (up to
        ``max_outage_requeues`` times); past the cap it counts like any retryable error.
        Retryable errors back off while attempts remain; everything else fails the job.
        """
        detail = {"type": type(error).__name__, "attempt": job.attempts, **error.detail}
        if isinstance(error, Outage) and job.outage_requeues < max_outage_requeues:
            delay = backoff_seconds(job.outage_requeues + 1, base, cap)
            detail.update(outage_requeue=job.outage_requeues + 1, retry_in_seconds=round(delay, 3))
            detail["message"] = error.message
            await self._fenced(self.db, "requeue_outage", job, public_message(error.message), detail, delay)
            return Outcome.REQUEUED
        if error.retryable and job.attempts < job.max_attempts:
            delay = backoff_seconds(job.attempts, base, cap)
            detail["retry_in_seconds"] = round(delay, 3)
            detail["message"] = error.message
            await self._fenced(self.db, "retry_later", job, public_message(error.message), detail, delay)
            return Outcome.RETRIED
        message = error.message
        if error.retryable:
            message = f"{message} (gave up after {job.attempts} attempt{'' if job.attempts == 1 else 's'})"
        await self.fail(job, message, detail)
        return Outcome.FAILED

    def _connection(self) -> Any:
        if isinstance(self.db, asyncpg.Pool):
            return self.db.acquire()
        return _Borrowed(self.db)


@dataclass(frozen=True)
class Completion:
    """One job's answer from ``complete_many``: still ours, and the images row written."""

    fenced: bool
    image_id: UUID | None


def _completion_row(job: Job, image: ImageRecord, position: int) -> dict[str, Any]:
    """One element of ``complete_batch``'s JSON input: the fence and the images row."""
    return {
        "job_id": str(job.id), "attempt": job.attempts, "owner_user_id": str(job.owner_user_id),
        "prompt": job.prompt, "prompt_hash": prompt_hash(job.prompt), "backend": image.backend,
        "model": image.model, "seed": image.seed, "steps": job.steps, "width": image.width,
        "height": image.height, "latency_ms": image.latency_ms,
        "cost_usd_estimate": image.cost_usd_estimate, "storage_path": image.storage_path,
        "mime_type": image.mime_type, "bytes": image.bytes, "sha256": image.sha256,
        "sidecar": dict(image.sidecar), "internals": dict(image.internals), "index": image.index,
        "thumbnail_path": image.thumbnail_path, "position": position,
    }  # fmt: skip


def _duplicate_image(job: Job, image: ImageRecord, exc: asyncpg.UniqueViolationError) -> TerminalError:
    """An images row that already exists is a fact to report, not a lost lease."""
    if exc.constraint_name in ("images_job_id_key", "images_job_index_key"):
        message = f"job {job.id} already has an image: another attempt finished it"
    else:
        message = (
            f"the image of job {job.id} could not be recorded: its storage path is taken by another image"
        )
    return TerminalError(
        message,
        detail={"operation": "insert_image", "constraint": exc.constraint_name,
                "storage_path": image.storage_path},
    )  # fmt: skip


def _columns(keys: Sequence[JobKey]) -> tuple[list[UUID], list[int]]:
    """(job, attempt) pairs as the two arrays the statements unnest."""
    return [key[0] for key in keys], [key[1] for key in keys]


class _Borrowed:
    """Lets a plain connection stand where a pool's ``acquire()`` context is expected."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def __aenter__(self) -> asyncpg.Connection:
        return self.conn

    async def __aexit__(self, *exc: object) -> None:
        return None
