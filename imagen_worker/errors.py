"""Errors a job can end with.

The queue decides what happens next from one bit, ``retryable``: retryable errors go back
to pending with backoff, everything else fails the job at once. ``message`` is the readable
sentence for operators; ``public_message`` reduces it to what the job's owner reads in
``jobs.error``, and ``detail`` (with the full message) stays in the worker-only
``job_runs.error_detail``.
"""

from __future__ import annotations

import html
import re
from typing import Any

MAX_PUBLIC_CHARS = 300

_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)
_MARKUP = re.compile(r"<(!doctype|html|head|body|script|style)\b.*", re.IGNORECASE | re.DOTALL)
_TAG = re.compile(r"<[^>]{0,200}>")
# A URL ends before the punctuation that closes the sentence around it: "(prompt x on
# http://gpu:8188); it was interrupted" keeps its ");".
_URL_BODY = r"[a-z][a-z0-9+.-]*://\S+?(?=[)\];,.]*(?:\s|$))"
# "at http://10.0.0.5:8188", "talking to https://x.supabase.co": the address goes with its preposition.
_PLACED_URL = re.compile(r"\s+(?:at|from|to|on|talking to|via)\s+" + _URL_BODY, re.IGNORECASE)
_URL = re.compile(_URL_BODY, re.IGNORECASE)
_HOST_PORT = re.compile(
    r"\b(?:\d{1,3}(?:\.\d{1,3}){3}|[a-z0-9-]+(?:\.[a-z0-9-]+)+|localhost):\d{2,5}\b", re.IGNORECASE
)
_IP = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}\b")
_PATH = re.compile(r"(?<![\w.])(?:/[\w.@+-]+){2,}/?")
_WINDOWS_PATH = re.compile(r"\b[A-Za-z]:\\\S+")
_SPACES = re.compile(r"\s+")


def public_message(text: str) -> str:
    """One clean sentence for a job's owner: no markup, addresses, paths or stack lines.

    HTML error pages keep only their title; URLs, ``host:port``, IP addresses and file paths
    are dropped or replaced by a neutral word; only the first line survives (a traceback's
    frames follow it), and the result is capped at ``MAX_PUBLIC_CHARS``.
    """
    text = str(text or "")
    if (title := _TITLE.search(text)) and _MARKUP.search(text):
        text = _MARKUP.sub(title.group(1).strip(), text, count=1)
    text = _MARKUP.sub("", text)
    text = html.unescape(_TAG.sub(" ", text))
    text = next((line for line in text.splitlines() if line.strip()), "")
    text = _PLACED_URL.sub("", text)
    text = _URL.sub("an internal address", text)
    text = _HOST_PORT.sub("an internal address", text)
    text = _IP.sub("an internal address", text)
    text = _WINDOWS_PATH.sub("a file", _PATH.sub("a file", text))
    text = _SPACES.sub(" ", text).strip(" :;,-—")
    if len(text) > MAX_PUBLIC_CHARS:
        text = text[: MAX_PUBLIC_CHARS - 1].rsplit(" ", 1)[0].rstrip(" :;,-—") + "…"
    return text or "the job failed for a reason only the operator's log shows"


def said(exc: BaseException) -> str:
    """An exception for a log line: its text, or its name when it has none (a timeout's
    ``str()`` is empty, which logged ``error=""``)."""
    return str(exc) or type(exc).__name__


class ConfigError(Exception):
    """The configuration cannot work; the message names the key or the backend."""


class SchemaError(ConfigError):
    """The database schema does not match this release: migrations pending, or one was edited."""


class EmbeddedServerError(Exception):
    """The embedded PostgreSQL did not start; the message says why and where its log is."""


class UnreadableJson(str):
    """A JSON column's value that PostgreSQL holds and Python cannot: a number past Python's
    4,300-digit limit for integers, or nesting past its recursion limit.

    The connection's decoder returns this, the reason as its text, instead of raising: a raise
    would come after the claim's commit and lose every row the claim took. A ``str``, so it
    prints and serialises anywhere; the pipeline fails the job that holds it.
    """


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


class StorageUnavailable(RetryableError):
    """Storage did not answer (transport errors, 429 or 5xx) through the sink's own retries.

    The worker then asks the sink whether Storage answers at all: while it does not, a job
    holding a rendered image waits for it instead of spending attempts (``storage.outage``).
    """


class Outage(RetryableError):
    """Something the job needs failed, not the job itself: the job goes back to pending without
    spending an attempt, up to a cap (``worker.max_outage_requeues``) that keeps a job which
    itself causes the failure from looping forever."""


class BackendUnavailable(Outage):
    """The backend's infrastructure failed (no instance answers, the instance died mid-job)."""


class OutputUnwritable(Outage):
    """This host could not write the job's files (a full, read-only or failing disk): another
    worker may take the job, and this one claims nothing until its output directory takes a
    file again (``worker.disk``)."""


class LeaseLost(Exception):
    """Another worker owns the job now: stop working on it and write nothing."""
