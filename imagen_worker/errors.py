"""Errors a job can end with.

The queue decides what happens next from one bit, ``retryable``: retryable errors go back
to pending with backoff, everything else fails the job at once. ``message`` is the readable
sentence stored in ``jobs.error``; ``detail`` is the structured record kept in ``error_detail``.
"""

from __future__ import annotations

from typing import Any


class ConfigError(Exception):
    """The configuration cannot work; the message names the key or the backend."""


class SchemaError(ConfigError):
    """The database schema does not match this release: migrations pending, or one was edited."""


class JobError(Exception):
    """A failure that belongs to one job, never to the daemon."""

    retryable: bool = False

    def __init__(self, message: str, *, detail: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail: dict[str, Any] = detail or {}


class TerminalError(JobError):
    """Retrying cannot help: bad parameters, unknown backend, validation refused."""

    retryable = False


class RetryableError(JobError):
    """A blip: backend unreachable, 5xx, timeout, storage outage, GPU out of memory."""

    retryable = True


class BackendUnavailable(RetryableError):
    """The backend's infrastructure failed, not the job (no instance answers, the instance died
    mid-job): the job goes back to pending without spending an attempt, up to a cap that keeps
    a job which itself crashes the backend from looping forever."""


class JobCancelled(Exception):
    """The job was cancelled by its owner while it ran; it ends ``cancelled``, not failed."""


class LeaseLost(Exception):
    """Another worker owns the job now: stop working on it and write nothing."""
