"""Helpers for the ComfyUI adapter specs: a JobContext double and a request builder."""

from __future__ import annotations

import uuid
from typing import Any

from imagen_worker.backends.base import GenerateRequest
from tests.fakes.comfyui import FakeComfyUI

# Small intervals keep every path fast; the production defaults are in config.py.
FAST = {"poll_interval": 0.2, "interrupt_grace": 1.0, "connect_timeout": 1.0, "timeout": 10}


class RecordingContext:
    """A JobContext double: remembers the ref, the progress and when the ref was stored."""

    def __init__(
        self,
        backend_ref: str | None = None,
        fake: FakeComfyUI | None = None,
        *,
        first_claim: bool = True,
        cancel_requested: bool = True,
    ) -> None:
        self._ref = backend_ref
        self.first_claim = first_claim  # False: a later attempt, which looks for the first prompt
        self.cancel_requested = cancel_requested  # True: cancellations are the owner's
        self._fake = fake
        self.refs: list[str] = []
        self.posts_before_ref: list[int] = []
        self.progress: list[tuple[float, float, dict[str, Any]]] = []
        self.previews: list[tuple[bytes, str]] = []

    @property
    def backend_ref(self) -> str | None:
        return self._ref

    async def set_backend_ref(self, ref: str) -> None:
        if self._fake is not None:
            self.posts_before_ref.append(len(self._fake.calls("POST", "/prompt")))
        self._ref = ref
        self.refs.append(ref)

    def report_progress(self, value: float, maximum: float, **extra: Any) -> None:
        self.progress.append((value, maximum, extra))

    def report_preview(self, data: bytes, mime_type: str) -> None:
        self.previews.append((data, mime_type))


def make_request(prompt: str = "a lighthouse at dusk", **fields: Any) -> GenerateRequest:
    values: dict[str, Any] = {
        "job_id": uuid.uuid4(),
        "prompt": prompt,
        "negative_prompt": None,
        "width": 512,
        "height": 512,
        "steps": 4,
        "seed": 42,
    }
    values.update(fields)
    return GenerateRequest(**values)
