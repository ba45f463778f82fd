"""Turn ComfyUI's error payloads into the sentence a user reads and the retry decision.

Rejections (400, or 200 with ``node_errors``) are terminal: the same graph is rejected again.
Execution errors are terminal too unless the cause is transient: out of memory (another job
may have held the VRAM), a CUDA/driver fault (the instance needs a restart) or a network error
inside an API node. The graph and seed are deterministic, so any other exception would recur.
A node that could not write its file because the server's disk is full, over quota or
read-only is the instance's failure, not the job's (``ServerDiskFull``): every prompt there
would fail the same way until its operator frees space.

When the instance itself is missing (unreachable, restarted, busy with other people's work for
longer than ``queue_timeout``) the error is ``BackendUnavailable``: the job goes back to the queue
without spending an attempt. Those sentences name no host: they may reach a web user while the
job waits; the instance is in ``detail``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from imagen_worker.errors import BackendUnavailable, JobError, RetryableError, TerminalError

MAX_DETAIL_CHARS = 2000
MAX_TRACEBACK_FRAMES = 5

# ``Backend.unavailable_reason`` while no instance answers: for the web user, no host names.
UNAVAILABLE = "the image server is not answering (it may be restarting); the job will start when it is back"
# ... and while every instance that answers cannot save images.
DISK_FULL = "the image server cannot save images right now (its disk is full); the job waits until it can"

_TRANSIENT_TYPES = ("OutOfMemoryError", "ConnectionError", "TimeoutError", "ConnectTimeout", "ReadTimeout")
_TRANSIENT_TEXT = ("out of memory", "cuda error", "cudnn", "device-side assert", "cublas")
# strerror of ENOSPC, EDQUOT and EROFS, as Python's OSError words them.
_DISK_TEXT = ("No space left on device", "Disk quota exceeded", "Read-only file system")


class ServerDiskFull(BackendUnavailable):
    """A node could not write its file on the ComfyUI server (disk full, over quota, read-only):
    the job goes back to pending without spending an attempt, and the instance takes no prompts
    for a while (``Pool.hold``)."""


def rejection(body: Any, *, queued: bool = False) -> TerminalError:
    """A ``POST /prompt`` answer that refused the graph (or, ``queued``, dropped outputs)."""
    body = body if isinstance(body, Mapping) else {}
    error = body.get("error") if isinstance(body.get("error"), Mapping) else {}
    node_errors = body.get("node_errors") if isinstance(body.get("node_errors"), Mapping) else {}
    reasons = [_node_reason(node_id, entry) for node_id, entry in node_errors.items()]
    if not reasons:
        text = str(error.get("message") or "unknown reason")
        details = error.get("details")
        reasons = [f"{text.rstrip('.')} ({details})" if details else text.rstrip(".")]
    if queued:
        lead = "ComfyUI accepted the workflow but dropped outputs that failed validation"
    else:
        lead = "ComfyUI rejected the workflow"
    detail = {"comfyui_error": _clip(dict(error)), "node_errors": _clip(dict(node_errors))}
    return TerminalError(f"{lead}: {'; '.join(reasons)}", detail=detail)


def execution_error(data: Mapping[str, Any], instance: str) -> JobError:
    """The ``execution_error`` message (from the socket or the history entry) as a job error."""
    node_id, node_type = data.get("node_id"), data.get("node_type")
    exc_type = str(data.get("exception_type") or "Exception")
    exc_message = str(data.get("exception_message") or "").strip()
    first_line = exc_message.splitlines()[0].strip() if exc_message else "no message"
    detail = {
        "instance": instance,
        "prompt_id": data.get("prompt_id"),
        "node_id": node_id,
        "node_type": node_type,
        "exception_type": exc_type,
        "exception_message": exc_message[:MAX_DETAIL_CHARS],
        "traceback": [str(frame)[:MAX_DETAIL_CHARS] for frame in (data.get("traceback") or [])][
            -MAX_TRACEBACK_FRAMES:
        ],
        "current_inputs": _clip(data.get("current_inputs") or {}, 200),
        "executed": data.get("executed") or [],
    }
    where = f"node {node_id} ({node_type})" if node_id else "a node"
    if disk := next((text for text in _DISK_TEXT if text in exc_message), None):
        return ServerDiskFull(
            f"ComfyUI cannot save images ({disk}, in {where}); the job waits until it can", detail=detail
        )
    if _transient(exc_type, exc_message):
        hint = " (out of GPU memory; will retry)" if "memory" in (exc_type + exc_message).lower() else ""
        return RetryableError(f"ComfyUI failed in {where}: {exc_type}: {first_line}{hint}", detail=detail)
    return TerminalError(f"ComfyUI failed in {where}: {exc_type}: {first_line}", detail=detail)


def interrupted(data: Mapping[str, Any], instance: str) -> RetryableError:
    """Someone else interrupted our prompt (the ComfyUI UI's cancel, a bare ``/interrupt``)."""
    node = f" in node {data.get('node_id')} ({data.get('node_type')})" if data.get("node_id") else ""
    return RetryableError(
        f"ComfyUI at {instance} interrupted the prompt{node}; it was cancelled on the ComfyUI side",
        detail={"instance": instance, "prompt_id": data.get("prompt_id"), "node_id": data.get("node_id")},
    )


def unreachable(instance: str, cause: str, text: str = "") -> BackendUnavailable:
    """ComfyUI did not answer at all (refused, timed out, no websocket)."""
    return BackendUnavailable(
        f"ComfyUI is unreachable ({cause}); the job waits until it answers again",
        detail={"instance": instance, "cause": cause, "exception": text[:MAX_DETAIL_CHARS]},
    )


def as_health(exc: JobError) -> str:
    """An instance's failure as a health line says it, without the job's part of the sentence."""
    if "cause" in exc.detail:
        return f"unreachable ({exc.detail['cause']})"
    return exc.message


def gateway(instance: str, status: int, where: str, detail: dict[str, Any]) -> BackendUnavailable:
    """502/503/504: a proxy with nothing behind it, or a server not ready yet."""
    return BackendUnavailable(
        f"ComfyUI answered {status} to {where} (it, or a proxy in front of it, is down); "
        "the job waits until it answers again",
        detail={**detail, "instance": instance},
    )


class PromptLost(BackendUnavailable):
    """Neither history nor queue knows the prompt: ComfyUI restarted, or someone removed it."""


def lost(instance: str, prompt_id: str) -> PromptLost:
    return PromptLost(
        f"ComfyUI no longer knows prompt {prompt_id} (it restarted, or the prompt was removed from its "
        "queue); the job will be submitted again",
        detail={"instance": instance, "prompt_id": prompt_id},
    )


def not_started(instance: str, prompt_id: str, within: float) -> BackendUnavailable:
    """Our prompt waited in ComfyUI's queue past ``queue_timeout``; it was taken back out."""
    return BackendUnavailable(
        f"ComfyUI did not start the job within {within:g} s (busy with other work); "
        "the job goes back to the queue",
        detail={"instance": instance, "prompt_id": prompt_id, "queue_timeout": within},
    )


def no_free_instance(within: float) -> BackendUnavailable:
    """No instance took the job within ``queue_timeout``: all busy with other work or gone."""
    return BackendUnavailable(
        f"no ComfyUI instance was free within {within:g} s (busy with other work); "
        "the job goes back to the queue",
        detail={"queue_timeout": within},
    )


def _node_reason(node_id: str, entry: Any) -> str:
    """``node 4 (CheckpointLoaderSimple) input ckpt_name: value not in list: 'x' not in [...]``."""
    entry = entry if isinstance(entry, Mapping) else {}
    parts = []
    for err in entry.get("errors") or []:
        if not isinstance(err, Mapping):
            continue
        message = str(err.get("message") or err.get("type") or "invalid").rstrip(".")
        message = message[:1].lower() + message[1:]
        extra = err.get("extra_info")
        extra = extra if isinstance(extra, Mapping) else {}
        input_name = str(extra.get("input_name") or "")
        details = str(err.get("details") or "")
        for sep in (": ", ", "):
            if input_name and details.startswith(input_name + sep):
                details = details[len(input_name) + len(sep) :]
        if details == input_name:
            details = ""
        text = f"input {input_name}: {message}" if input_name else message
        parts.append(f"{text}: {_clip(details, 300)}" if details else text)
    return f"node {node_id} ({entry.get('class_type', '?')}) {'; '.join(parts) or 'is invalid'}"


def _transient(exc_type: str, message: str) -> bool:
    text = message.lower()
    return any(name in exc_type for name in _TRANSIENT_TYPES) or any(t in text for t in _TRANSIENT_TEXT)


def _clip(value: Any, limit: int = MAX_DETAIL_CHARS) -> Any:
    """Shorten long strings anywhere in a JSON value (tensor reprs run to kilobytes)."""
    if isinstance(value, str):
        return value if len(value) <= limit else value[:limit] + f"... [{len(value) - limit} more chars]"
    if isinstance(value, Mapping):
        return {str(k): _clip(v, limit) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clip(v, limit) for v in value]
    return value
