"""The backend contract every adapter implements.

An adapter registers a ``type`` name, owns its
config block (the framework never reads below ``type``) and turns a ``GenerateRequest`` into
image bytes. Adapters know nothing about the queue; what they may tell the job goes through
``JobContext``. What a job may ask for is the adapter's typed ``Params`` model plus its
``Limits``; the pipeline checks every request with ``check_request`` before ``generate``.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, Self
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from imagen_worker.errors import ConfigError, TerminalError

# What the job row has a column for: params can never set these (the row is the truth).
ROW_FIELDS = ("prompt", "negative_prompt", "seed", "steps", "width", "height", "style")


@dataclass(frozen=True)
class GenerateRequest:
    job_id: UUID
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    steps: int | None
    seed: int
    params: Mapping[str, Any] = field(default_factory=dict)
    style: str | None = None
    owner_user_id: UUID | None = None
    # A per-job workflow from a trusted source (the operator-only ``jobs.workflow`` column);
    # its shape is the adapter's business, and adapters without workflows refuse it.
    workflow: Mapping[str, Any] | None = None
    # The job's input images (``params.images``), fetched from its owner's Storage folder and
    # checked by the pipeline before ``generate``: workflow name -> image.
    inputs: Mapping[str, InputImage] = field(default_factory=dict)
    # How many images the job asks for (jobs.n); an adapter returns them as image + extras.
    n: int = 1


@dataclass(frozen=True)
class InputImage:
    """One input image, already read and checked: a PNG, JPEG or WebP within the pixel cap."""

    key: str  # where it came from: a Storage key inside the owner's folder
    data: bytes
    mime_type: str
    width: int
    height: int

    @property
    def extension(self) -> str:
        return {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}[self.mime_type]


class Limits(BaseModel):
    """Ceilings every backend config carries, checked against the row before anything runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_pixels: int = Field(default=2048 * 2048, ge=64 * 64)
    max_steps: int = Field(default=150, ge=1)
    max_batch: int = Field(default=4, ge=1)


class OutputDefaults(BaseModel):
    """A backend's own default output ``format`` and ``quality``, from its config block.

    Precedence: the job's columns, then these, then the worker's ``output:`` section. Adapter
    blocks inherit these keys; the framework reads them only through ``Backend.output_defaults``,
    never from the block itself.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["png", "webp", "jpeg"] | None = None
    quality: int | None = Field(default=None, ge=1, le=100)

    def defaults(self) -> OutputDefaults:
        """Just these two keys, whatever block model carries them."""
        return OutputDefaults(format=self.format, quality=self.quality)


class Params(BaseModel):
    """Base of every adapter's params model: unknown keys are refused, values never coerced."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    def batch(self) -> int:
        """How many images the job asks for (checked against ``max_batch``)."""
        return 1


def _clip(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shown_key(part: object) -> str:
    """A key as a message shows it: as is when plain, else quoted, so a line stays one line."""
    text = str(part)
    plain = text.isprintable() and text.strip() == text and 0 < len(text) <= 64
    return text if plain else _clip(text, 64)


def describe_errors(exc: ValidationError, prefix: str = "", limit: int = 3) -> str:
    """Pydantic's errors as one line: ``key: reason (got value)``, joined by ``; ``."""
    parts = []
    for error in exc.errors(include_url=False)[:limit]:
        key = prefix + ".".join(map(shown_key, error["loc"])) if error["loc"] else prefix.rstrip(".")
        message = str(error["msg"]).replace("\n", " ").removeprefix("Value error, ")
        message = message[:1].lower() + message[1:]
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        elif error["type"] not in ("missing", "value_error") and not isinstance(error.get("input"), dict):
            message += f" (got {_clip(error.get('input'))})"
        parts.append(f"{key}: {message}" if key else message)
    more = len(exc.errors()) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def explain(exc: ValidationError, model: type[Params]) -> str:
    """A params error as one line, naming what the model accepts when a key is unknown."""
    text = describe_errors(exc, prefix="params.")
    if any(e["type"] == "extra_forbidden" for e in exc.errors()):
        text += f" (accepted: {', '.join(sorted(model.model_fields)) or 'none'})"
    return text


def config_error(name: str, exc: ValidationError, model: type[BaseModel] | None = None) -> ConfigError:
    """The ``backend "NAME": key: reason`` line for an invalid config block."""
    text = describe_errors(exc)
    if model is not None and any(e["type"] == "extra_forbidden" for e in exc.errors()):
        text += f" (known: {', '.join(sorted(set(model.model_fields) - {'type'}))})"
    return ConfigError(f'backend "{name}": {text}')


@dataclass(frozen=True)
class Output:
    """One artifact a backend produced: in memory, or streamed to a file (``path``) it owns.

    The pipeline reads it once and then discards it; ``origin`` says where it came from (a
    ComfyUI node and file) for the image's sidecar.
    """

    data: bytes = b""
    mime_type: str = "application/octet-stream"
    name: str = ""
    path: Path | None = None
    origin: Mapping[str, Any] = field(default_factory=dict)

    def read(self) -> bytes:
        return self.path.read_bytes() if self.path is not None else self.data

    def discard(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


@dataclass
class GenerateResult:
    """The main image, then the rest of the batch; each becomes its own images row."""

    image: Output
    metadata: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    extra_outputs: list[Output] = field(default_factory=list)
    # Seconds per stage the backend can tell apart (submit, execute, download), for the
    # per-stage timing in the images row's sidecar and in metrics.
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Health:
    ok: bool
    detail: str = ""
    info: Mapping[str, Any] = field(default_factory=dict)


class JobContext(Protocol):
    """What an adapter may tell the job while it runs."""

    @property
    def backend_ref(self) -> str | None:
        """The reference an earlier attempt stored (e.g. a ComfyUI prompt id), for recovery."""

    async def set_backend_ref(self, ref: str) -> None:
        """Persist the backend's id for this job before submitting; raises ``LeaseLost``."""

    @property
    def first_claim(self) -> bool:
        """True on the job's first claim ever: no earlier attempt can have submitted anything.

        An adapter may then submit under an id derived from the job id alone, with no
        ``set_backend_ref`` (a commit) before it: a later attempt (False here) looks for that id.
        A resubmission needs an id of its own, stored with ``set_backend_ref`` first.
        """

    def report_progress(self, value: float, maximum: float, **extra: Any) -> None:
        """Record progress; cheap to call often (the caller throttles database writes).

        ``extra`` carries what a web page shows: ``eta_seconds``, ``node``, ``stage``,
        ``message``; ``percent`` is ``value / maximum`` unless given.
        """

    def report_preview(self, data: bytes, mime_type: str) -> None:
        """Offer a live preview frame (JPEG or PNG); cheap to call often, the latest one wins."""

    @property
    def cancel_requested(self) -> bool:
        """Why ``generate`` was cancelled: True when the job's owner cancelled it, so remote work
        must stop; False when the worker only lets go (lease lost, shutdown), so remote work
        should go on for the next owner, who adopts it (``backend_ref``, ``first_claim``)."""


class Backend(abc.ABC):
    """Base class for adapters.

    Cancellation arrives as ``asyncio.CancelledError`` in ``generate``; ``ctx.cancel_requested``
    says whether to stop the remote work too.
    """

    type_name: ClassVar[str]
    # The adapter's params model; a backend whose choices come from its config overrides
    # ``params_model`` instead.
    params_type: ClassVar[type[Params]] = Params

    def __init__(self, name: str) -> None:
        self.name = name
        self._on_change: Callable[[], None] = lambda: None

    @classmethod
    @abc.abstractmethod
    def from_config(cls, name: str, block: Mapping[str, Any]) -> Self:
        """Validate the adapter's own block; raise ``ConfigError('backend "NAME": reason')``."""

    @property
    def capacity(self) -> int:
        """How many jobs this backend can usefully hold right now (claims never exceed it).

        It may change at run time (instances lost, busy with others' work); call
        ``notify_change`` when it grows so the worker claims again at once.
        """
        return 1

    @property
    def unavailable_reason(self) -> str | None:
        """None while the backend can take work; else one sentence a web user may read.

        While it is set the worker claims nothing for this backend and the waiting jobs' rows
        say why; the jobs stay pending. Call ``notify_change`` when it changes.
        """
        return None

    @property
    def unavailable_detail(self) -> str | None:
        """The operator's version of ``unavailable_reason``, for ``imagen workers``: which
        instance, what is wrong. Set exactly while ``unavailable_reason`` is."""
        return self.unavailable_reason

    def watch(self, on_change: Callable[[], None]) -> None:
        """The worker's wake-up, called by ``notify_change``."""
        self._on_change = on_change

    def notify_change(self) -> None:
        """Capacity or availability changed: the worker re-reads both and claims again."""
        self._on_change()

    # --- params: checked by the pipeline before ``generate`` ---------------------------

    @property
    def limits(self) -> Limits:
        return Limits()

    @property
    def output_defaults(self) -> OutputDefaults:
        """The format and quality this backend's images get unless the job says otherwise."""
        return OutputDefaults()

    @property
    def params_model(self) -> type[Params]:
        return self.params_type

    def check_request(self, request: GenerateRequest) -> GenerateRequest:
        """The request with its params validated, or ``TerminalError`` in one sentence naming the key.

        The pipeline calls this before ``generate``, so the worker and ``imagen generate``
        refuse the same jobs and nothing unchecked ever reaches the backend.
        """
        if request.workflow is not None:
            raise TerminalError(f'backend "{self.name}" does not run per-job workflows')
        return self.validate_params(request, self.params_model)

    def validate_params(self, request: GenerateRequest, model: type[Params]) -> GenerateRequest:
        """Row columns stay out of params, the row is within ``limits``, params fit ``model``."""
        for key in request.params:
            if key in ROW_FIELDS:
                raise TerminalError(
                    f"params.{key} is not allowed: the job's own {key} column sets it",
                    detail={"param": key},
                )
        limits = self.limits
        if request.width * request.height > limits.max_pixels:
            raise TerminalError(
                f"the image size {request.width}x{request.height} is over backend "
                f'"{self.name}"\'s limit of {limits.max_pixels} pixels (max_pixels)',
                detail={"max_pixels": limits.max_pixels},
            )
        if request.steps is not None and request.steps > limits.max_steps:
            raise TerminalError(
                f'steps {request.steps} is over backend "{self.name}"\'s limit of {limits.max_steps} '
                "(max_steps)",
                detail={"max_steps": limits.max_steps},
            )
        try:
            # The owner in the context: input image keys must lie in the owner's own folder.
            parsed = model.model_validate(dict(request.params), context={"owner": request.owner_user_id})
        except ValidationError as exc:
            raise TerminalError(
                f'backend "{self.name}" refused the job\'s params: {explain(exc, model)}',
                detail={"params": [".".join(map(shown_key, e["loc"])) for e in exc.errors()[:20]]},
            ) from None
        if parsed.batch() > limits.max_batch:
            raise TerminalError(
                f'params.batch_size {parsed.batch()} is over backend "{self.name}"\'s limit of '
                f"{limits.max_batch} (max_batch)",
                detail={"max_batch": limits.max_batch},
            )
        if request.n > limits.max_batch:
            raise TerminalError(
                f'n {request.n} is over backend "{self.name}"\'s limit of {limits.max_batch} images '
                "per job (max_batch)",
                detail={"max_batch": limits.max_batch},
            )
        return dataclasses.replace(request, params=parsed.model_dump(exclude_unset=True))

    async def start(self) -> None:
        """Open long-lived connections; called once before the first job."""

    async def aclose(self) -> None:
        """Release connections."""

    async def health(self) -> Health:
        return Health(ok=True)

    @abc.abstractmethod
    async def generate(self, request: GenerateRequest, ctx: JobContext) -> GenerateResult:
        """Produce the image or raise a ``JobError`` subclass that says why not."""
