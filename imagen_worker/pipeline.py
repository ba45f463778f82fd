"""The one generate path, shared by the worker and ``imagen generate``.

resolve backend -> style -> ``backend.generate`` -> each image of the batch converted to the
job's format (with metadata embedded or stripped), its thumbnail and sidecar on local disk ->
storage sink. The keys are a pure function of owner, job and index (``storage.keys``), the same
on every host and attempt.
The worker records the upload in the database as it completes (``job_runs.result``), so a
retry on any host links the stored object instead of generating again. A small per-job
journal in the output directory is only a cache on top: a retry on the same host after a
failed upload sends the same file again. ``discard`` removes a job's files and journal once
it has failed or been cancelled.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

from imagen_worker import inputs, output, styles
from imagen_worker.backends.base import Backend, GenerateRequest, GenerateResult, JobContext, Output
from imagen_worker.config import OutputConfig
from imagen_worker.errors import JobError, OutputUnwritable, TerminalError, UnreadableJson
from imagen_worker.queue.jobs import ImageRecord, JobSpec
from imagen_worker.storage import keys, outage
from imagen_worker.storage.base import StorageSink

_MAX_SEED = 2**32 - 1
# Sidecar entries about the worker host, not the image: kept in imagen.image_internals, never
# in the images row its owner reads.
INTERNAL_SIDECAR_KEYS = ("local_path", "backend_metadata")


def derived_seed(job_id: UUID) -> int:
    """A job without a seed gets one derived from its id: random per job, stable across retries."""
    return int.from_bytes(hashlib.sha256(job_id.bytes).digest()[:4], "big") & _MAX_SEED


@dataclass
class Picture:
    """One image of a job's batch, on local disk, with the key it is stored under."""

    index: int
    image_path: Path
    storage_key: str
    mime_type: str
    bytes: int
    sha256: str
    sidecar: dict[str, Any]
    sidecar_path: Path | None = None
    width: int | None = None  # read from the file; None when it is not a still image
    height: int | None = None
    thumbnail_path: Path | None = None
    thumbnail_key: str | None = None


@dataclass
class Artifact:
    """What the pipeline produced for one job: its batch, main image first."""

    pictures: list[Picture]
    seed: int
    backend: str
    model: str | None
    latency_ms: int
    timings: dict[str, float] = field(default_factory=dict)
    upload_error: JobError | None = None
    reused: bool = False

    @property
    def main(self) -> Picture:
        return self.pictures[0]

    @property
    def uploaded(self) -> bool:
        """Some file went to object storage (rather than staying on this host as ``local:``)."""
        stored = [p.storage_key for p in self.pictures] + [p.thumbnail_key or "" for p in self.pictures]
        return any(key and not key.startswith(keys.LOCAL_PREFIX) for key in stored)

    # The main image's facts, for callers that show one image.
    @property
    def image_path(self) -> Path:
        return self.main.image_path

    @property
    def sidecar_path(self) -> Path | None:
        return self.main.sidecar_path

    @property
    def storage_key(self) -> str:
        return self.main.storage_key

    @property
    def mime_type(self) -> str:
        return self.main.mime_type

    @property
    def sha256(self) -> str:
        return self.main.sha256

    @property
    def sidecar(self) -> dict[str, Any]:
        return self.main.sidecar

    @property
    def width(self) -> int | None:
        return self.main.width

    @property
    def height(self) -> int | None:
        return self.main.height

    def image_records(self) -> list[ImageRecord]:
        """The images rows: each sidecar without host internals, which travel apart."""
        return [self._record(picture) for picture in self.pictures]

    def _record(self, picture: Picture) -> ImageRecord:
        public = {k: v for k, v in picture.sidecar.items() if k not in INTERNAL_SIDECAR_KEYS}
        internals = {k: picture.sidecar[k] for k in INTERNAL_SIDECAR_KEYS if k in picture.sidecar}
        return ImageRecord(
            storage_path=picture.storage_key, mime_type=picture.mime_type, bytes=picture.bytes,
            sha256=picture.sha256, backend=self.backend, seed=self.seed, latency_ms=self.latency_ms,
            sidecar=public, model=self.model, width=picture.width, height=picture.height,
            internals=internals, index=picture.index, thumbnail_path=picture.thumbnail_key,
        )  # fmt: skip


@dataclass
class _JobFiles:
    """A job's files as they are written: the images' flushes in flight, and every path to
    remove should the job's file work fail."""

    flushing: list[concurrent.futures.Future[None]] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)

    def flush(self, path: Path, data: bytes) -> None:
        """Write an image durably on another thread (``output.start_write_image``)."""
        self.written.append(path)
        self.flushing.append(output.start_write_image(path, data))

    def settle(self) -> None:
        """Wait for every flush, failed or not: none may outlive the job's file work."""
        concurrent.futures.wait(self.flushing)

    def check(self) -> None:
        for flushed in self.flushing:
            flushed.result()  # a failed write raises here

    def remove(self) -> None:
        for path in self.written:
            path.unlink(missing_ok=True)


def _picture(raw: dict[str, Any]) -> Picture:
    paths = ("image_path", "sidecar_path", "thumbnail_path")
    return Picture(**{**raw, **{name: raw[name] and Path(raw[name]) for name in paths}})


def _journal_path(directory: Path, job_id: UUID) -> Path:
    return directory / ".imagen-journal" / f"{job_id}.json"


def _read_journal(directory: Path, job_id: UUID) -> Artifact | None:
    path = _journal_path(directory, job_id)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        artifact = Artifact(**{**raw, "pictures": [_picture(p) for p in raw["pictures"]]})
    except (OSError, ValueError, TypeError, KeyError):
        return None
    for picture in artifact.pictures:
        if not picture.image_path.exists():
            return None
        if hashlib.sha256(picture.image_path.read_bytes()).hexdigest() != picture.sha256:
            return None
        if picture.thumbnail_path is not None and not picture.thumbnail_path.exists():
            return None
    artifact.reused = True
    return artifact


def _write_journal(directory: Path, job_id: UUID, artifact: Artifact) -> Path:
    # Shallow: ``asdict`` would deep-copy every sidecar only to serialise it.
    raw = {f.name: getattr(artifact, f.name) for f in fields(artifact) if f.name != "upload_error"}
    raw["pictures"] = [vars(picture) for picture in artifact.pictures]
    path = _journal_path(directory, job_id)
    output.write_copy(path, json.dumps(raw, default=str).encode())
    return path


def forget(directory: Path, job_id: UUID) -> concurrent.futures.Future[None]:
    """Drop the journal once the job's result is recorded durably, on a file thread.

    Not waited for: a journal left behind (the unlink failed) costs only disk space, since a
    job that is done never runs again.
    """
    return output.start_remove(_journal_path(directory, job_id))


def discard(directory: Path, job_id: UUID) -> None:
    """A failed or cancelled job leaves nothing behind: its images, thumbnails, sidecars, journal."""
    path = _journal_path(directory, job_id)
    files: list[Path] = []
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        for picture in raw["pictures"]:
            names = (picture.get(key) for key in ("image_path", "sidecar_path", "thumbnail_path"))
            files.extend(Path(name) for name in names if name)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        files = []
    for file in files:
        if file.is_relative_to(directory):
            file.unlink(missing_ok=True)
    path.unlink(missing_ok=True)


class Pipeline:
    def __init__(
        self,
        backends: Mapping[str, Backend],
        default_backend: str,
        sink: StorageSink,
        output_config: OutputConfig,
    ) -> None:
        self.backends = backends
        self.default_backend = default_backend
        self.sink = sink
        self.output = output_config

    def resolve(self, name: str | None) -> Backend:
        backend = self.backends.get(name or self.default_backend)
        if backend is None:
            # What this worker serves is the operator's to know, not the job's owner's.
            raise TerminalError(
                f"unknown backend {name!r}: no worker serves it",
                detail={"backend": name, "served": sorted(self.backends)},
            )
        return backend

    async def run(
        self,
        job_id: UUID,
        spec: JobSpec,
        ctx: JobContext,
        *,
        strict_upload: bool = True,
        rendered: Callable[[], None] = lambda: None,
        resume: bool = True,
        patience: outage.Patience | None = None,
    ) -> Artifact:
        """Generate (or reuse a journaled result), write locally, then store.

        With ``strict_upload`` an upload failure raises (the worker retries the job); without
        it the error is returned on the artifact (the CLI reports it and exits 0). ``rendered``
        is called once the image is on local disk, before the upload; with ``patience`` the
        upload waits for as long as Storage does not answer (``storage.outage``). ``resume``
        False says no earlier attempt ran (a job's first claim), so there is no journal to look
        for: a file lookup on the event loop is a wait for the interpreter lock when file
        threads are busy.
        """
        # File work (fsync, hashing) runs in a thread: heartbeats share this event loop.
        directory = self.output.directory
        artifact = None
        if resume and _journal_path(directory, job_id).exists():  # an earlier attempt on this host
            artifact = await asyncio.to_thread(_read_journal, directory, job_id)
        if artifact is None:
            artifact = await self._generate(job_id, spec, ctx, patience)
        rendered()
        started = time.perf_counter()
        try:
            for picture in artifact.pictures:
                picture.storage_key = await self._store(
                    picture.storage_key, picture.image_path, picture.mime_type, patience
                )
                if picture.thumbnail_path is not None and picture.thumbnail_key is not None:
                    picture.thumbnail_key = await self._store(
                        picture.thumbnail_key, picture.thumbnail_path, "image/webp", patience
                    )
        except JobError as exc:
            if strict_upload:
                raise
            artifact.upload_error = exc
        artifact.timings["upload"] = time.perf_counter() - started
        return artifact

    async def _store(self, key: str, path: Path, mime_type: str, patience: outage.Patience | None) -> str:
        """Upload one file; the key the images row records (``local:`` when it stayed here)."""
        if key.startswith(keys.LOCAL_PREFIX):
            return key  # a journaled artifact that local storage kept before
        stored = await outage.put(self.sink, key, path, mime_type, patience)
        # Nothing stored under the key: local storage keeps the output file itself.
        return keys.LOCAL_PREFIX + key if stored.in_place else key

    async def _generate(
        self, job_id: UUID, spec: JobSpec, ctx: JobContext, patience: outage.Patience | None
    ) -> Artifact:
        for name, value in (("params", spec.params), ("workflow", spec.workflow)):
            if isinstance(value, UnreadableJson):
                raise TerminalError(f"{name} cannot be read: {value}")
        backend = self.resolve(spec.backend)
        prompt, negative = styles.apply(spec.style, spec.prompt, spec.negative_prompt)
        seed = spec.seed if spec.seed is not None else derived_seed(job_id)
        request = GenerateRequest(
            job_id=job_id, prompt=prompt, negative_prompt=negative, width=spec.width,
            height=spec.height, steps=spec.steps, seed=seed, params=dict(spec.params), style=spec.style,
            owner_user_id=spec.owner_user_id, workflow=spec.workflow, n=spec.n,
        )  # fmt: skip
        # The adapter's params model and limits, before anything reaches the backend.
        request = backend.check_request(request)
        request = await inputs.attach(
            request, self.sink, max_pixels=backend.limits.max_pixels, backend=backend.name, patience=patience
        )
        started = time.perf_counter()
        result = await backend.generate(request, ctx)
        generated = time.perf_counter()

        try:
            artifact = await asyncio.to_thread(
                self._write_files, job_id, spec, backend, request, result, generated - started
            )
        except OSError as exc:  # a full or read-only disk: the host's failure, not the job's
            raise OutputUnwritable(
                f"could not write the image to the output directory ({exc.strerror or exc})",
                detail={"directory": str(self.output.directory), "error": str(exc)},
            ) from None
        artifact.timings["write"] = time.perf_counter() - generated
        return artifact

    def _write_files(
        self,
        job_id: UUID,
        spec: JobSpec,
        backend: Backend,
        request: GenerateRequest,
        result: GenerateResult,
        generate_seconds: float,
    ) -> Artifact:
        """Every image of the batch, its thumbnail and its sidecar on local disk, and the journal
        that lets a retry on this host reuse them: one thread hop for all of a job's file work.

        The images are flushed to disk on threads of their own while the rest, the journal
        included, is written. The journal need not wait for them: a retry reuses only images
        whose bytes match the journal's sha256, so one that never became durable is rendered
        again; and the stage still returns only once every image is durable.
        """
        when = datetime.now().astimezone()
        latency_ms = int(generate_seconds * 1000)
        outputs = [result.image, *result.extra_outputs]
        files = _JobFiles()
        pictures: list[Picture] = []
        try:
            try:
                for index, produced in enumerate(outputs):
                    pictures.append(
                        self._write_picture(
                            index, produced, spec, backend, request, result, when, latency_ms, files
                        )
                    )
                artifact = Artifact(
                    pictures=pictures, seed=request.seed, backend=backend.name, model=result.model,
                    latency_ms=latency_ms, timings={"generate": generate_seconds, **result.timings},
                )  # fmt: skip
                files.written.append(_write_journal(self.output.directory, job_id, artifact))
            finally:
                for produced in outputs:
                    produced.discard()  # a backend's temporary files, written into place or not
                files.settle()
            files.check()
        except (OSError, JobError):  # a full disk, a damaged image: nothing of the job stays
            files.remove()  # the journal goes with them: nothing else would ever remove them
            raise
        return artifact

    def _embedded(
        self, spec: JobSpec, request: GenerateRequest, result: GenerateResult, index: int
    ) -> dict[str, Any]:
        """What goes inside the image file: enough to make it again. An image of a batch says
        which one it is: they share the seed and differ by their place in the batch."""
        embedded: dict[str, Any] = {
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt,
            "seed": request.seed,
            "steps": spec.steps,
            "model": result.model,
            "params": dict(request.params),
        }
        batch_size = len(result.extra_outputs) + 1
        if batch_size > 1:
            embedded |= {"index": index, "batch_size": batch_size}
        workflow = result.metadata.get("workflow_graph")
        if workflow is not None and self.output.embed_workflow:
            embedded["workflow"] = workflow
        return {"imagen": embedded}

    def _write_picture(
        self,
        index: int,
        produced: Output,
        spec: JobSpec,
        backend: Backend,
        request: GenerateRequest,
        result: GenerateResult,
        when: datetime,
        latency_ms: int,
        files: _JobFiles,
    ) -> Picture:
        job_id, seed = request.job_id, request.seed
        # The job's columns, then the backend's block, then the worker's output section.
        own = backend.output_defaults
        fmt = spec.format or own.format or self.output.format
        quality = spec.quality or own.quality or self.output.quality
        embedded = self._embedded(spec, request, result, index) if self.output.embed_metadata else None
        size = self.output.thumbnail_size
        data, facts, small = output.encode(
            produced.read(), fmt, quality, embedded, declared_mime=produced.mime_type, thumbnail_size=size,
            backend_text=self.output.embed_workflow,
        )  # fmt: skip
        names = output.plan_names(
            self.output.naming, prompt=spec.prompt, seed=seed, backend=backend.name,
            mime_type=facts.mime_type, job_id=job_id, owner_user_id=spec.owner_user_id, when=when,
            index=index,
        )  # fmt: skip
        image_path = output.claim_path(self.output.directory, names.relative, job_id)
        files.flush(image_path, data)
        thumbnail_path = thumbnail_key = None
        if small is None and size:
            small = output.thumbnail(data, size)  # started after the image's flush, to overlap it
        if small is not None:
            thumbnail_path = output.thumbnail_path(image_path)
            output.write_copy(thumbnail_path, small)  # derived from the image: no fsync of its own
            files.written.append(thumbnail_path)
            thumbnail_key = keys.thumbnail_key(spec.owner_user_id, job_id, index)
        sha256 = hashlib.sha256(data).hexdigest()
        sidecar: dict[str, Any] = {
            "job_id": str(job_id),
            "index": index,
            "batch_size": len(result.extra_outputs) + 1,
            "prompt": spec.prompt,
            "styled_prompt": request.prompt,
            "negative_prompt": request.negative_prompt,
            "style": spec.style,
            "backend": backend.name,
            "backend_type": backend.type_name,
            "model": result.model,
            "seed": seed,
            "steps": spec.steps,
            "width": facts.width,
            "height": facts.height,
            "requested_size": [spec.width, spec.height],
            "params": dict(request.params),
            "mime_type": facts.mime_type,
            "bytes": len(data),
            "sha256": sha256,
            "storage_path": names.storage_key,
            "thumbnail_path": thumbnail_key,
            "local_path": str(image_path),
            "created_at": when.astimezone(UTC).isoformat(),  # not the worker's time zone
            "latency_ms": latency_ms,
            "output": produced.origin,
            "backend_metadata": result.metadata if index == 0 else {},
        }
        sidecar_path = output.write_sidecar(image_path, sidecar) if self.output.write_metadata_json else None
        if sidecar_path is not None:
            files.written.append(sidecar_path)
        return Picture(
            index=index, image_path=image_path, storage_key=names.storage_key, mime_type=facts.mime_type,
            bytes=len(data), sha256=sha256, sidecar=sidecar, sidecar_path=sidecar_path,
            width=facts.width, height=facts.height, thumbnail_path=thumbnail_path,
            thumbnail_key=thumbnail_key,
        )  # fmt: skip
