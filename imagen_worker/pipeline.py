"""The one generate path, shared by the worker and ``imagen generate``.

resolve backend -> style -> ``backend.generate`` -> image + sidecar on local disk -> storage
sink. The storage key is ``<owner id>/<job id>.<ext>``, the same on every host and attempt.
The worker records the upload in the database as it completes (``job_runs.result``), so a
retry on any host links the stored object instead of generating again. A small per-job
journal in the output directory is only a cache on top: a retry on the same host after a
failed upload sends the same file again. ``discard`` removes a job's files and journal once
it has failed or been cancelled.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID

from imagen_worker import inputs, output, styles
from imagen_worker.backends.base import Backend, GenerateRequest, GenerateResult, JobContext
from imagen_worker.config import OutputConfig
from imagen_worker.errors import JobError, TerminalError
from imagen_worker.queue.jobs import ImageRecord, JobSpec
from imagen_worker.storage import keys
from imagen_worker.storage.base import StorageSink

_MAX_SEED = 2**32 - 1
# Sidecar entries about the worker host, not the image: kept in imagen.image_internals, never
# in the images row its owner reads.
INTERNAL_SIDECAR_KEYS = ("local_path", "backend_metadata")


def derived_seed(job_id: UUID) -> int:
    """A job without a seed gets one derived from its id: random per job, stable across retries."""
    return int.from_bytes(hashlib.sha256(job_id.bytes).digest()[:4], "big") & _MAX_SEED


@dataclass
class Artifact:
    """What the pipeline produced for one job."""

    image_path: Path
    sidecar_path: Path | None
    storage_key: str
    mime_type: str
    bytes: int
    sha256: str
    seed: int
    backend: str
    model: str | None
    latency_ms: int
    sidecar: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    upload_error: JobError | None = None
    reused: bool = False
    width: int | None = None  # read from the file; None when it is not a still image
    height: int | None = None

    def image_record(self) -> ImageRecord:
        """The images row: the sidecar without host internals, which travel apart."""
        public = {k: v for k, v in self.sidecar.items() if k not in INTERNAL_SIDECAR_KEYS}
        internals = {k: self.sidecar[k] for k in INTERNAL_SIDECAR_KEYS if k in self.sidecar}
        return ImageRecord(
            storage_path=self.storage_key, mime_type=self.mime_type, bytes=self.bytes,
            sha256=self.sha256, backend=self.backend, seed=self.seed, latency_ms=self.latency_ms,
            sidecar=public, model=self.model, width=self.width, height=self.height, internals=internals,
        )  # fmt: skip


def _journal_path(directory: Path, job_id: UUID) -> Path:
    return directory / ".imagen-journal" / f"{job_id}.json"


def _read_journal(directory: Path, job_id: UUID) -> Artifact | None:
    path = _journal_path(directory, job_id)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        artifact = Artifact(
            **{
                **raw,
                "image_path": Path(raw["image_path"]),
                "sidecar_path": raw["sidecar_path"] and Path(raw["sidecar_path"]),
            }
        )
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if not artifact.image_path.exists():
        return None
    if hashlib.sha256(artifact.image_path.read_bytes()).hexdigest() != artifact.sha256:
        return None
    artifact.reused = True
    return artifact


def _write_journal(directory: Path, job_id: UUID, artifact: Artifact) -> None:
    raw = asdict(artifact)
    raw.pop("upload_error")
    raw["image_path"] = str(artifact.image_path)
    raw["sidecar_path"] = str(artifact.sidecar_path) if artifact.sidecar_path else None
    output.write_copy(_journal_path(directory, job_id), json.dumps(raw, default=str).encode())


def forget(directory: Path, job_id: UUID) -> None:
    """Drop the journal once the job's result is recorded durably."""
    _journal_path(directory, job_id).unlink(missing_ok=True)


def discard(directory: Path, job_id: UUID) -> None:
    """A failed or cancelled job leaves nothing behind: its image, extras, sidecar, journal."""
    path = _journal_path(directory, job_id)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        image = Path(raw["image_path"])
        extras = raw.get("sidecar", {}).get("extra_outputs") or []
        files = [image, *(image.with_name(str(name)) for name in extras)]
        if raw.get("sidecar_path"):
            files.append(Path(raw["sidecar_path"]))
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
            served = ", ".join(sorted(self.backends)) or "none"
            raise TerminalError(
                f"unknown backend {name!r}: no worker serves it (this worker serves: {served})",
                detail={"backend": name},
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
    ) -> Artifact:
        """Generate (or reuse a journaled result), write locally, then store.

        With ``strict_upload`` an upload failure raises (the worker retries the job); without
        it the error is returned on the artifact (the CLI reports it and exits 0). ``rendered``
        is called once the image is on local disk, before the upload.
        """
        # File work (fsync, hashing) runs in a thread: heartbeats share this event loop.
        directory = self.output.directory
        artifact = await asyncio.to_thread(_read_journal, directory, job_id)
        if artifact is None:
            artifact = await self._generate(job_id, spec, ctx)
            await asyncio.to_thread(_write_journal, directory, job_id, artifact)
        rendered()
        started = time.perf_counter()
        try:
            stored = await self.sink.put(artifact.storage_key, artifact.image_path, artifact.mime_type)
            if stored.location == artifact.image_path.resolve().as_uri():
                # Nothing was stored under the key: local storage keeps the output file itself.
                artifact.storage_key = keys.LOCAL_PREFIX + artifact.storage_key
        except JobError as exc:
            if strict_upload:
                raise
            artifact.upload_error = exc
        artifact.timings["upload"] = time.perf_counter() - started
        return artifact

    async def _generate(self, job_id: UUID, spec: JobSpec, ctx: JobContext) -> Artifact:
        backend = self.resolve(spec.backend)
        prompt, negative = styles.apply(spec.style, spec.prompt, spec.negative_prompt)
        seed = spec.seed if spec.seed is not None else derived_seed(job_id)
        request = GenerateRequest(
            job_id=job_id, prompt=prompt, negative_prompt=negative, width=spec.width,
            height=spec.height, steps=spec.steps, seed=seed, params=dict(spec.params), style=spec.style,
            owner_user_id=spec.owner_user_id, workflow=spec.workflow,
        )  # fmt: skip
        # The adapter's params model and limits, before anything reaches the backend.
        request = backend.check_request(request)
        request = await inputs.attach(
            request, self.sink, max_pixels=backend.limits.max_pixels, backend=backend.name
        )
        started = time.perf_counter()
        result = await backend.generate(request, ctx)
        generated = time.perf_counter()

        artifact = await asyncio.to_thread(
            self._write_files, spec, backend, request, result, generated - started
        )
        artifact.timings["write"] = time.perf_counter() - generated
        return artifact

    def _write_files(
        self,
        spec: JobSpec,
        backend: Backend,
        request: GenerateRequest,
        result: GenerateResult,
        generate_seconds: float,
    ) -> Artifact:
        """The image, its extra outputs and the sidecar on local disk, before any upload."""
        job_id, seed = request.job_id, request.seed
        when = datetime.now().astimezone()
        data = result.image.data
        facts = output.image_facts(data, result.image.mime_type)
        names = output.plan_names(
            self.output.naming, prompt=spec.prompt, seed=seed, backend=backend.name,
            mime_type=facts.mime_type, job_id=job_id, owner_user_id=spec.owner_user_id, when=when,
        )  # fmt: skip
        image_path = output.claim_path(self.output.directory, names.relative, job_id)
        output.write_image(image_path, data)
        extra_paths = []
        for index, extra in enumerate(result.extra_outputs, start=1):
            ext = output.extension_for(extra.mime_type)
            extra_path = image_path.with_name(f"{image_path.stem}-{index}.{ext}")
            output.write_image(extra_path, extra.data)
            extra_paths.append(extra_path.name)
        sha256 = hashlib.sha256(data).hexdigest()
        latency_ms = int(generate_seconds * 1000)
        sidecar: dict[str, Any] = {
            "job_id": str(job_id),
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
            "local_path": str(image_path),
            "created_at": when.isoformat(),
            "latency_ms": latency_ms,
            "extra_outputs": extra_paths,
            "backend_metadata": result.metadata,
        }
        sidecar_path = output.write_sidecar(image_path, sidecar) if self.output.write_metadata_json else None
        return Artifact(
            image_path=image_path, sidecar_path=sidecar_path, storage_key=names.storage_key,
            mime_type=facts.mime_type, bytes=len(data), sha256=sha256, seed=seed,
            backend=backend.name, model=result.model, latency_ms=latency_ms, sidecar=sidecar,
            timings={"generate": generate_seconds, **result.timings}, width=facts.width, height=facts.height,
        )  # fmt: skip
