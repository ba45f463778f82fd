"""The ComfyUI wire protocol for one instance: the HTTP calls and one long-lived websocket.

This is the one place that knows how ComfyUI talks:

- One socket per instance with a stable ``clientId``, opened before any POST, and every POST
  carries that ``client_id``: without it ComfyUI sends no execution events at all.
- Events are routed by ``data.prompt_id``. Unknown types (custom nodes broadcast their own) and
  ``executing`` without a prompt id (sent on reconnect) are ignored.
- Binary frames are images: a u32 type, then for type 1 a u32 format (1 JPEG, 2 PNG) and the
  image, for type 4 a u32 length, that much JSON metadata (``prompt_id``, ``node_id``,
  ``image_type``) and the image. Type 4 comes only to a socket whose first frame announced
  ``supports_preview_metadata``, which ours does (a server that has not read that first frame
  yet, just after a connect, still sends type 1); type 1 carries no prompt id and belongs to
  the prompt and node that are executing (the last ``executing`` event). Both reach the
  prompt's watch as ``PREVIEW`` events; those of a ``SaveImageWebsocket`` node are the job's
  outputs, not previews (``frames.py``).
- ComfyUI never pings and replays nothing. We ping (every ``ping_interval``, a missing pong
  after ``ping_timeout`` drops the socket), and after a drop we reconnect with backoff,
  always closing the old socket first: a second socket with the same clientId takes over the
  routing, and closing the old one afterwards would silently unroute the new one.
- ``/history/{id}`` answers ``{}`` for unknown, pending, deleted and pre-restart ids alike, so
  "gone" is only decided together with ``/queue``; see ``backend.py``.
- ``/queue``, ``/interrupt`` and ``/history`` POSTs answer 200 with an empty body.
- ``POST /upload/image`` (multipart ``image``, ``subfolder``, ``type``, ``overwrite``) stores an
  input file and answers ``{"name", "subfolder", "type"}``; a ``LoadImage`` names it
  ``subfolder/name``. Without ``overwrite=true`` a name clash becomes ``name (1).ext`` (unless
  the bytes are identical), and a subfolder leaving the input directory is a bare 400.
- Newer servers have a Jobs API whose ``POST /api/jobs/{id}/cancel`` dequeues or interrupts
  atomically; older ones answer 404 or 405 (their frontend's static route takes any path, for
  GET only). The first cancel finds out which, once per connection.
- ``status`` messages (queue length) are broadcast to every socket on every queue change, also
  for other clients' prompts: the owner hears about foreign work through ``on_change``.

The socket also tells whether the instance is there at all (``link``): a drop followed by a
successful reconnect is a blip, a failed connect attempt means ComfyUI is stopped, restarting
or cut off.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import hashlib
import json
import re
import struct
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import httpx
import structlog
from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

from imagen_worker.backends.comfyui import failures
from imagen_worker.errors import BackendUnavailable, RetryableError, TerminalError

log = structlog.get_logger(__name__)

MAX_FRAME_BYTES = 64 * 2**20  # a 2048² SaveImageWebsocket frame is 8 MB; the library default is 1 MiB
PING_INTERVAL = 5.0
PING_TIMEOUT = 5.0
RECONNECT_DELAYS = (0.05, 0.25, 1.0, 2.0, 5.0)  # the last one repeats

# Synthetic events a watch receives besides ComfyUI's own messages.
SOCKET_CONNECTED = "socket_connected"  # also after a reconnect: events may have been missed
SOCKET_DOWN = "socket_down"  # a reconnect failed: the instance, and the prompt with it, may be gone
PREVIEW = "preview"  # a binary image frame: data {prompt_id, node, mime_type, image}
# The first frame our socket sends: ask for previews that name their prompt (binary type 4).
FEATURE_FLAGS = json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
_PREVIEW_FORMATS = {1: "image/jpeg", 2: "image/png"}
# 5xx answers that mean "nothing behind the proxy" or "not ready", not "this request broke it".
_GATEWAY_STATUSES = frozenset({502, 503, 504})


# An output whose answer declares at most this many bytes is kept in memory; a larger one, or
# one of unknown size, streams to a spool file. Below it a file costs more than it saves: a
# create and an unlink in a shared directory per image.
IN_MEMORY_BYTES = 8 * 1024 * 1024


class OutputTooLarge(Exception):
    """An output went past the backend's ``max_output_bytes``."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"over {limit} bytes")
        self.limit = limit


class Link(enum.Enum):
    """Whether the instance is there, as its websocket tells."""

    CONNECTING = "connecting"  # no connect attempt has finished yet
    UP = "up"  # connected, or dropped with no failed reconnect yet
    DOWN = "down"  # the last connect attempt failed


@dataclass(frozen=True)
class FileRef:
    """One file an output node wrote, as listed in ``history.outputs`` (fetched via ``/view``)."""

    node_id: str
    kind: str  # the output key: images, gifs, videos, audio, ...
    filename: str
    subfolder: str
    type: str  # output | temp | input


@dataclass(frozen=True)
class QueueState:
    running: frozenset[str]
    pending: frozenset[str]
    clients: Mapping[str, str | None] = field(default_factory=dict)  # prompt id -> its client_id

    def __contains__(self, prompt_id: object) -> bool:
        return prompt_id in self.running or prompt_id in self.pending

    def foreign(self, ours: Collection[str]) -> frozenset[str]:
        """Prompts neither in ``ours`` nor sent by any client of this process (another backend
        of this worker on the same ComfyUI shares it, it does not compete)."""
        return frozenset(
            pid
            for pid in self.running | self.pending
            if pid not in ours and self.clients.get(pid) not in ComfyUIClient.local_ids
        )


class PromptWatch:
    """The socket events for one prompt id, in arrival order."""

    def __init__(self) -> None:
        self._events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def put(self, event: dict[str, Any]) -> None:
        self._events.put_nowait(event)

    async def get(self, within: float) -> dict[str, Any] | None:
        """The next event, or None when ``within`` seconds pass without one."""
        # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancellation that arrives
        # just as the event does, and a cancelled job would then carry on.
        try:
            async with asyncio.timeout(max(within, 0.0)):
                return await self._events.get()
        except TimeoutError:
            return None


class ComfyUIClient:
    """HTTP + websocket to one ComfyUI instance at ``base_url``."""

    local_ids: ClassVar[set[str]] = set()  # the client ids of every started client in this process

    def __init__(
        self,
        base_url: str,
        *,
        headers: Mapping[str, str],
        connect_timeout: float,
        ping_interval: float = PING_INTERVAL,
        ping_timeout: float = PING_TIMEOUT,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._ping = (ping_interval, ping_timeout)
        # The prompt and node a type 1 frame belongs to: the last ``executing`` event's.
        self._executing: tuple[str, str | None] | None = None
        self.client_id = f"imagen-worker-{uuid.uuid4().hex}"
        self.version: str | None = None
        self._headers = dict(headers)
        self._connect_timeout = connect_timeout
        self._http: httpx.AsyncClient | None = None
        self._socket_task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._answered = asyncio.Event()  # the first connect attempt ended, either way
        self._watches: dict[str, PromptWatch] = {}
        self._jobs_api: bool | None = None  # unknown until the first cancel on this connection
        self.link = Link.CONNECTING
        # Called when ``link`` changes or ComfyUI reports a queue change (anyone's prompt).
        self.on_change: Callable[[], None] = lambda: None
        # The last ``status`` broadcast's count of prompts running or pending (anyone's);
        # None until one arrived, and again once the socket is lost.
        self.broadcast_remaining: int | None = None

    # --- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        ComfyUIClient.local_ids.add(self.client_id)
        if self._http is None:
            timeout = httpx.Timeout(60.0, connect=self._connect_timeout)
            self._http = httpx.AsyncClient(base_url=self.base_url, headers=self._headers, timeout=timeout)
        if self._socket_task is None:
            self._socket_task = asyncio.create_task(self._run_socket(), name=f"comfyui-ws {self.base_url}")

    async def aclose(self) -> None:
        ComfyUIClient.local_ids.discard(self.client_id)
        if self._socket_task is not None:
            self._socket_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._socket_task
            self._socket_task = None
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_answered(self, within: float) -> None:
        """Until the first connect attempt ended, either way, or ``within`` seconds passed: a
        refused connection is known at once, and start-up need not wait out the timeout."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await self._answered.wait()

    async def wait_connected(self, within: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await self._connected.wait()
        return self.connected

    @contextlib.contextmanager
    def watch(self, prompt_id: str) -> Iterator[PromptWatch]:
        """Receive ``prompt_id``'s events; register before the POST so none is missed."""
        watch = PromptWatch()
        self._watches[prompt_id] = watch
        try:
            yield watch
        finally:
            self._watches.pop(prompt_id, None)

    # --- HTTP -------------------------------------------------------------------------

    async def submit(self, graph: Mapping[str, Any], prompt_id: str) -> dict[str, Any]:
        """``POST /prompt``; 400 raises the rejection, the 200 answer may still carry node_errors."""
        body = {"prompt": graph, "client_id": self.client_id, "prompt_id": prompt_id}
        response = await self._request("POST", "/prompt", json=body)
        if response.status_code == 400:
            raise failures.rejection(_json(response))
        answer = _as_dict(_json(self._check(response)))
        if answer.get("prompt_id", prompt_id) != prompt_id:
            await self._not_our_prompt(str(answer["prompt_id"]), prompt_id)
        return answer

    async def history(self, prompt_id: str) -> dict[str, Any] | None:
        """The history entry, or None (unknown, pending, deleted or forgotten: ComfyUI can't tell)."""
        data = _json(self._check(await self._request("GET", f"/history/{prompt_id}")))
        entry = data.get(prompt_id) if isinstance(data, dict) else None
        return entry if isinstance(entry, dict) else None

    async def queue(self) -> QueueState:
        data = _as_dict(_json(self._check(await self._request("GET", "/queue"))))

        def rows(key: str) -> list[list[Any]]:
            return [row for row in data.get(key) or [] if isinstance(row, list) and len(row) > 1]

        running, pending = rows("queue_running"), rows("queue_pending")
        return QueueState(
            running=frozenset(str(row[1]) for row in running),
            pending=frozenset(str(row[1]) for row in pending),
            clients={str(row[1]): _client_id(row) for row in running + pending},
        )

    async def delete_pending(self, prompt_id: str) -> None:
        """Remove a pending prompt. Silent: no event will ever come for it."""
        self._check(await self._request("POST", "/queue", json={"delete": [prompt_id]}))

    async def interrupt(self, prompt_id: str) -> None:
        """Interrupt our prompt only if it is the running one (0.3.56+). Never a bare interrupt."""
        self._check(await self._request("POST", "/interrupt", json={"prompt_id": prompt_id}))

    async def cancel(self, prompt_id: str) -> bool | None:
        """``POST /api/jobs/{id}/cancel``: dequeue or interrupt in one step where the server can.

        True when it cancelled something, False when the prompt was not there (finished or
        unknown), None when the server has no Jobs API (then use ``delete_pending`` and
        ``interrupt``).
        """
        if self._jobs_api is False:
            return None
        response = await self._request("POST", f"/api/jobs/{prompt_id}/cancel")
        if response.status_code in (404, 405):
            self._jobs_api = False
            return None
        answer = _as_dict(_json(self._check(response)))
        self._jobs_api = True
        return bool(answer.get("cancelled"))

    async def system_stats(self) -> dict[str, Any]:
        stats = _as_dict(_json(self._check(await self._request("GET", "/system_stats"))))
        system = stats.get("system")
        if isinstance(system, dict) and isinstance(system.get("comfyui_version"), str):
            self.version = system["comfyui_version"]
        return stats

    async def queue_remaining(self) -> int:
        data = _as_dict(_json(self._check(await self._request("GET", "/prompt"))))
        return int(_as_dict(data.get("exec_info")).get("queue_remaining", 0))

    async def upload_image(self, data: bytes, filename: str, subfolder: str, mime_type: str) -> str:
        """``POST /upload/image`` into ``subfolder`` (overwriting); the name ``LoadImage`` takes."""
        response = await self._request(
            "POST",
            "/upload/image",
            files={"image": (filename, data, mime_type)},
            data={"subfolder": subfolder, "type": "input", "overwrite": "true"},
        )
        answer = _as_dict(_json(self._check(response)))
        name, folder = answer.get("name"), answer.get("subfolder")
        if not isinstance(name, str) or not name or not isinstance(folder, str):
            raise RetryableError(
                f"ComfyUI at {self.base_url} answered POST /upload/image without a file name",
                detail={"instance": self.base_url, "body": response.text[:500]},
            )
        return f"{folder}/{name}" if folder else name

    async def download_to(self, ref: FileRef, target: Path, limit: int) -> tuple[bytes | None, int, str, str]:
        """One output file from ``/view``, refusing more than ``limit`` bytes: in memory when the
        answer declares at most ``IN_MEMORY_BYTES`` (returned), else streamed into a new file
        ``target`` (None returned).

        Also returns the size, the content type and the SHA-256 of the bytes, hashed as they
        arrive: a streamed file is never held in memory whole, and never read back to be hashed.
        """
        params = {"filename": ref.filename, "subfolder": ref.subfolder, "type": ref.type}
        http = self._client()
        written = 0
        digest = hashlib.sha256()
        try:
            async with http.stream("GET", "/view", params=params) as response:
                status = response.status_code
                if status in _GATEWAY_STATUSES:
                    detail = {"instance": self.base_url, "status": status, "file": ref.__dict__}
                    raise failures.gateway(self.base_url, status, "GET /view", detail)
                if status != 200:
                    raise RetryableError(
                        f"ComfyUI at {self.base_url} answered {status} for output file "
                        f"{ref.subfolder}/{ref.filename} ({ref.type})",
                        detail={"instance": self.base_url, "file": ref.__dict__},
                    )
                declared = response.headers.get("content-length", "")
                kept = bytearray() if declared.isdigit() and int(declared) <= IN_MEMORY_BYTES else None
                with contextlib.ExitStack() as files:
                    # A file takes small chunks into the page cache: no thread hop per chunk.
                    write: Callable[[bytes], object] = (
                        kept.extend if kept is not None else files.enter_context(open(target, "xb")).write  # noqa: ASYNC230
                    )
                    async for chunk in response.aiter_bytes():
                        written += len(chunk)
                        if written > limit:
                            raise OutputTooLarge(limit)
                        write(chunk)
                        digest.update(chunk)
                mime = response.headers.get("content-type", "application/octet-stream").split(";")[0]
                data = bytes(kept) if kept is not None else None
                return data, written, mime.strip(), digest.hexdigest()
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc

    async def delete_history(self, prompt_ids: Collection[str]) -> None:
        """``POST /history {"delete": [...]}``: ComfyUI forgets the entries (not the files)."""
        self._check(await self._request("POST", "/history", json={"delete": list(prompt_ids)}))

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self._client().request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            raise RuntimeError("ComfyUIClient.start() was not called")
        return self._http

    def _unreachable(self, exc: Exception) -> BackendUnavailable:
        return failures.unreachable(self.base_url, _why_unreachable(exc), f"{type(exc).__name__}: {exc}")

    def _check(self, response: httpx.Response) -> httpx.Response:
        status = response.status_code
        if status < 400:
            return response
        where = f"{response.request.method} {response.request.url.path}"
        detail = {"instance": self.base_url, "status": status, "body": response.text[:500]}
        if status in _GATEWAY_STATUSES:
            raise failures.gateway(self.base_url, status, where, detail)
        if status >= 500:
            raise RetryableError(f"ComfyUI at {self.base_url} answered {status} to {where}", detail=detail)
        if status in (401, 403, 404, 407):
            # A proxy refusing us, a wrong base_url or ComfyUI's Origin check: the instance
            # setup is wrong, not the job. Retry with backoff until someone fixes it.
            raise RetryableError(
                f"ComfyUI at {self.base_url} answered {status} to {where}; check base_url, headers and any "
                "proxy in front of ComfyUI",
                detail=detail,
            )
        raise TerminalError(f"ComfyUI at {self.base_url} answered {status} to {where}", detail=detail)

    # --- version and installed nodes ----------------------------------------------------

    async def version_problem(self) -> str | None:
        """None when this instance is new enough; else one line naming its version."""
        if self.version is None:
            await self.system_stats()
        found = _version_tuple(self.version)
        if found is not None and found >= MIN_VERSION:
            return None
        need = ".".join(map(str, MIN_VERSION))
        shown = f"version {self.version}" if self.version else "a version too old to report itself"
        return (
            f"ComfyUI at {self.base_url} is {shown}; imagen-worker needs {need} or newer (client-chosen "
            "prompt ids and interrupting one prompt by id)"
        )

    async def object_info(self, class_type: str) -> dict[str, Any] | None:
        """``GET /object_info/{class}``: the node's input spec, or None when it is not installed."""
        data = _as_dict(_json(self._check(await self._request("GET", f"/object_info/{class_type}"))))
        spec = data.get(class_type)
        return spec if isinstance(spec, dict) else None

    async def _not_our_prompt(self, theirs: str, ours: str) -> None:
        """ComfyUI queued our graph under another id: take it back out and say why."""
        with contextlib.suppress(RetryableError, TerminalError):
            await self.delete_pending(theirs)
        raise RetryableError(
            f"ComfyUI at {self.base_url} queued our prompt {ours} as {theirs}: it ignores client-chosen "
            "prompt ids, so the job could not be followed; upgrade ComfyUI",
            detail={"instance": self.base_url, "prompt_id": ours, "answered_prompt_id": theirs},
        )

    # --- websocket --------------------------------------------------------------------

    def _socket_url(self) -> str:
        scheme, _, rest = self.base_url.partition("://")
        ws_scheme = "wss" if scheme == "https" else "ws"
        return f"{ws_scheme}://{rest}/ws?clientId={self.client_id}"

    async def _run_socket(self) -> None:
        """Keep one socket open for the client's lifetime; reconnect with backoff after a drop."""
        failures_in_a_row = 0
        while True:
            opened = False
            error = "closed by the server"
            try:
                async with connect(
                    self._socket_url(),
                    additional_headers=self._headers,
                    max_size=MAX_FRAME_BYTES,
                    ping_interval=self._ping[0],
                    ping_timeout=self._ping[1],
                    open_timeout=self._connect_timeout,
                    close_timeout=2.0,
                ) as socket:
                    opened = True
                    failures_in_a_row = 0
                    await socket.send(FEATURE_FLAGS)
                    self._connected.set()
                    self._executing = None  # events were missed: a type 1 frame is nobody's now
                    self.version = None  # a reconnect may mean a restarted (upgraded) server
                    self._jobs_api = None
                    log.info("comfyui socket connected", instance=self.base_url)
                    self._set_link(Link.UP)
                    self._notify_all({"type": SOCKET_CONNECTED, "data": {}})
                    async for frame in socket:
                        if isinstance(frame, str):
                            self._dispatch(frame)
                        else:
                            self._dispatch_binary(frame)
            except (OSError, TimeoutError, WebSocketException) as exc:
                error = f"{type(exc).__name__}: {exc}".rstrip(": ")
            finally:
                self._connected.clear()
                self.broadcast_remaining = None
            if opened:
                log.warning("comfyui socket lost; reconnecting", instance=self.base_url, error=error)
            elif self.link is not Link.DOWN:
                log.warning("comfyui instance not answering", instance=self.base_url, error=error)
                self._set_link(Link.DOWN)
                self._notify_all({"type": SOCKET_DOWN, "data": {}})
            delay = RECONNECT_DELAYS[min(failures_in_a_row, len(RECONNECT_DELAYS) - 1)]
            failures_in_a_row += 1
            await asyncio.sleep(delay)

    def _dispatch(self, frame: str) -> None:
        try:
            message = json.loads(frame)
        except ValueError:
            return
        if not isinstance(message, dict) or not isinstance(message.get("data"), dict):
            return
        if message.get("type") == "status":
            remaining = (message["data"].get("status") or {}).get("exec_info", {}).get("queue_remaining")
            self.broadcast_remaining = remaining if isinstance(remaining, int) else None
            self.on_change()  # the queue changed: maybe someone else's prompt
            return
        prompt_id = message["data"].get("prompt_id")
        if message.get("type") in ("execution_start", "executing") and isinstance(prompt_id, str):
            node = message["data"].get("node", "")
            self._executing = None if node is None else (prompt_id, str(node) if node else None)
        watch = self._watches.get(prompt_id) if isinstance(prompt_id, str) else None
        if watch is not None:
            watch.put(message)

    def _dispatch_binary(self, frame: bytes) -> None:
        preview = parse_preview(frame)
        if preview is None:
            return
        if preview.get("prompt_id") is None and self._executing is not None:
            preview["prompt_id"], node = self._executing
            preview["node"] = preview["node"] or node
        watch = self._watches.get(preview["prompt_id"]) if preview["prompt_id"] else None
        if watch is not None:
            watch.put({"type": PREVIEW, "data": preview})

    def _set_link(self, link: Link) -> None:
        if link is not Link.CONNECTING:
            self._answered.set()
        if link is not self.link:
            self.link = link
            self.on_change()

    def _notify_all(self, event: dict[str, Any]) -> None:
        for watch in self._watches.values():
            watch.put(event)


def _why_unreachable(exc: Exception) -> str:
    """The cause in words: httpx says "All connection attempts failed" for a refused connection,
    whose errno sits further down the exception's chain."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno == errno.ECONNREFUSED:
            return "connection refused"
        cause = cause.__cause__ or cause.__context__
    if isinstance(exc, httpx.ConnectTimeout):
        return "no answer to the connection"
    if isinstance(exc, httpx.TimeoutException):
        return "no answer in time"
    if isinstance(exc, httpx.ConnectError):
        return "cannot connect"
    return type(exc).__name__


def parse_preview(frame: bytes) -> dict[str, Any] | None:
    """A binary frame as ``{prompt_id, node, mime_type, image}``; None for other kinds or garbage."""
    if len(frame) < 8:
        return None
    kind, word = struct.unpack_from(">II", frame)
    if kind == 1 and word in _PREVIEW_FORMATS:
        return {"prompt_id": None, "node": None, "mime_type": _PREVIEW_FORMATS[word], "image": frame[8:]}
    if kind != 4 or 8 + word > len(frame):
        return None
    try:
        meta = json.loads(frame[8 : 8 + word])
    except ValueError:
        return None
    if not isinstance(meta, dict) or meta.get("image_type") not in _PREVIEW_FORMATS.values():
        return None
    prompt_id, node = meta.get("prompt_id"), meta.get("node_id")
    return {
        "prompt_id": prompt_id if isinstance(prompt_id, str) else None,
        "node": node if isinstance(node, str) else None,
        "mime_type": meta["image_type"],
        "image": frame[8 + word :],
    }


def _json(response: httpx.Response) -> Any:
    if not response.content:
        return {}
    try:
        return response.json()
    except ValueError:
        return {}


def _client_id(row: list[Any]) -> str | None:
    """``extra_data.client_id`` of a ``/queue`` row ``[number, id, graph, extra_data, outputs]``."""
    extra = row[3] if len(row) > 3 and isinstance(row[3], dict) else {}
    client_id = extra.get("client_id")
    return client_id if isinstance(client_id, str) else None


def _as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


# ComfyUI 0.3.56 is the first release with both things the adapter relies on: ``POST /prompt``
# honouring the client's ``prompt_id`` (how a retry finds its earlier prompt) and
# ``POST /interrupt {"prompt_id"}`` stopping only that prompt (older servers stop whatever runs).
MIN_VERSION = (0, 3, 56)


def _version_tuple(version: str | None) -> tuple[int, int, int] | None:
    match = re.match(r"v?(\d+)\.(\d+)\.(\d+)", version or "")
    return (int(match[1]), int(match[2]), int(match[3])) if match else None
