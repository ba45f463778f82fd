"""The backend contract every adapter implements.

An adapter registers a ``type`` name, owns its
config block (the framework never reads below ``type``) and turns a ``GenerateRequest`` into
image bytes. Adapters know nothing about the queue; what they may tell the job goes through
``JobContext``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, Self
from uuid import UUID


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


@dataclass(frozen=True)
class Output:
    """One artifact a backend produced, held in memory once."""

    data: bytes
    mime_type: str
    name: str = ""


@dataclass
class GenerateResult:
    """The primary image plus anything else the backend produced (kept beside it locally)."""

    image: Output
    metadata: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    extra_outputs: list[Output] = field(default_factory=list)


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

    def report_progress(self, value: float, maximum: float, **extra: Any) -> None:
        """Record progress; cheap to call often (the caller throttles database writes)."""

    @property
    def cancel_requested(self) -> bool:
        """Why ``generate`` was cancelled: True when the job's owner cancelled it, so remote work
        must stop; False when the worker only lets go (lease lost, shutdown), so remote work
        should go on for the next owner, who adopts it through ``backend_ref``."""


class Backend(abc.ABC):
    """Base class for adapters.

    Cancellation arrives as ``asyncio.CancelledError`` in ``generate``; ``ctx.cancel_requested``
    says whether to stop the remote work too.
    """

    type_name: ClassVar[str]

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

    def watch(self, on_change: Callable[[], None]) -> None:
        """The worker's wake-up, called by ``notify_change``."""
        self._on_change = on_change

    def notify_change(self) -> None:
        """Capacity or availability changed: the worker re-reads both and claims again."""
        self._on_change()

    async def start(self) -> None:
        """Open long-lived connections; called once before the first job."""

    async def aclose(self) -> None:
        """Release connections."""

    async def health(self) -> Health:
        return Health(ok=True)

    @abc.abstractmethod
    async def generate(self, request: GenerateRequest, ctx: JobContext) -> GenerateResult:
        """Produce the image or raise a ``JobError`` subclass that says why not."""
