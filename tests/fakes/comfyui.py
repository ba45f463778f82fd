"""A protocol-faithful fake of ComfyUI 0.3.64 for tests.

It is an aiohttp server on 127.0.0.1 (ephemeral port) with the real routes (bare and under
``/api``), the real JSON shapes (bodies recorded from a real 0.3.64) and the traps:
events only reach the prompt's ``client_id`` socket, history is written *after*
``execution_success`` (``history_delay`` widens that race), fully cached reruns hand back the old
filename, 200 answers with ``node_errors`` drop outputs, a pending prompt deleted from the queue
never produces an event, a reused clientId replaces the socket (and closing the old one unroutes
the new one), nothing is replayed on reconnect, ``stop()`` (a killed process: connections
refused, queue, history and sockets forgotten) and ``start()`` again on the same port, and
``status`` broadcasts to every socket on every queue change, whoever's prompt it is, and
history ``outputs`` in an order unrelated to execution (the real server builds it from a set;
only the ``executed`` events come in execution order). ``POST /history {"delete"}`` forgets the
entries but, like the real server, leaves the output files served by ``/view``.
``SaveImageWebsocket`` sends each image as a binary frame the way 0.3.64 does: type 1 (format 2,
PNG) after ``progress``, or type 4 with JSON metadata before it to a socket whose first frame
asked for ``supports_preview_metadata``; it writes nothing to history, sends no ``executed``,
and is never cached (its ``IS_CHANGED`` is the time). ``SaveLatent`` saves one ``.latent`` file
listed under ``latents``.

0.3.64 has no Jobs API: the frontend's static route takes any path for GET only, so
``POST /api/jobs/{id}/cancel`` answers 405. ``jobs_api=True`` plays a newer server, whose
cancel dequeues a pending prompt or interrupts the running one in one step and answers
``{"cancelled": bool}``.

Input images: ``POST /upload/image`` (multipart ``image``, ``subfolder``, ``type``, ``overwrite``)
stores into ``files`` like the real server (a name clash without ``overwrite`` becomes
``x (1).png`` unless the bytes are identical; a subfolder or name leaving the directory is a bare
400), ``LoadImage`` / ``LoadImageMask`` accept only existing names (else the real
``custom_validation_failed`` "Invalid image file"), and a ``LoadImage`` -> ``ImageInvert`` /
``ImageScale`` chain saves the real pixels (inverted, scaled), so sizes and colours can be
checked. The input folder starts with ``example.png``, as a fresh install does.

Control knobs: ``plan`` (per prompt: duration and outcome; by default read from markers such as
``[fake:duration=0.5]``, ``[fake:error]``, ``[fake:oom]`` in any string input), ``default_duration``,
``history_delay``, ``post_delay`` (a slow ``POST /prompt``: the prompt is queued only after it),
``frame_interval`` (seconds between a ``SaveImageWebsocket``'s frames: large images, a slow link),
``latent_previews`` (a server started with ``--preview-method``: each KSampler step sends a JPEG
preview frame, latent-sized, the same way as ``SaveImageWebsocket``'s),
``pause()``/``resume()``, ``refuse_websockets``, ``mute_events``, ``stall_sockets()`` (open but
silent: no events, no pongs), ``fail_next`` (answer the next
requests to a route with an HTTP status), ``drop_sockets()``, ``stop()``/``start()``,
``restart()`` and ``submit_foreign()`` (a prompt from someone else, as from the ComfyUI UI).
Instrumentation: ``requests`` (every request), ``interrupts``, ``job_cancels``, ``executions``
(the fake GPU's busy intervals, see ``idle_gaps()``), ``max_queued_by_client`` and
``frames_sent`` (``(prompt_id, node, index)`` of every ``SaveImageWebsocket`` frame).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.parser
import email.policy
import heapq
import io
import itertools
import json
import mimetypes
import posixpath
import re
import struct
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from aiohttp import ClientSession, WSMsgType, web
from PIL import Image, ImageOps

VERSION = "0.3.64"
DEFAULT_CHECKPOINTS = (
    "flux1-schnell-fp8.safetensors",
    "sd_xl_base_1.0.safetensors",
    "v1-5-pruned-emaonly.safetensors",
)
OOM_MESSAGE = (
    "Allocation on device \nThis error means you ran out of memory on your GPU.\n\n"
    "TIPS: If the workflow worked before you might have accidentally set the batch_size to a large number."
)
_MARKER = re.compile(r"\[fake:([a-z_]+)(?:=([^\]]+))?\]")
_EXECUTION_ONLY = frozenset(
    {"execution_start", "execution_cached", "execution_success", "execution_error", "executing", "executed"}
)


def _set_ordered(outputs: dict[str, Any]) -> dict[str, Any]:
    """History outputs in an order unrelated to execution, as ComfyUI's (built from a set) are."""
    return {nid: outputs[nid] for nid in sorted(outputs, key=lambda nid: zlib.crc32(nid.encode()))}


def tiny_png(rgb: tuple[int, int, int], width: int = 8, height: int = 8) -> bytes:
    """A valid RGB PNG of one colour, built with zlib/struct only."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        )

    rows = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


# --- node catalogue: just enough of NODE_CLASS_MAPPINGS for validation -------------------

_INT = "INT"
_FLOAT = "FLOAT"
_STRING = "STRING"
_COMBO = "COMBO"
_IMAGE_FILE = "IMAGE_FILE"  # LoadImage's image: any existing input file (its VALIDATE_INPUTS)


@dataclass(frozen=True)
class NodeSpec:
    inputs: dict[str, tuple[Any, ...]]  # name -> (kind, ...); kind INT/FLOAT/STRING/COMBO or a link type
    outputs: tuple[str, ...] = ()
    output_node: bool = False


def _node_catalogue(checkpoints: tuple[str, ...]) -> dict[str, NodeSpec]:
    size = (_INT, 1, 16384, 512)
    latent_size = (_INT, 16, 16384, 1024)
    return {
        "EmptyImage": NodeSpec(
            {
                "width": size,
                "height": size,
                "batch_size": (_INT, 1, 4096, 1),
                "color": (_INT, 0, 16777215, 0),
            },
            ("IMAGE",),
        ),
        "ImageInvert": NodeSpec({"image": ("IMAGE",)}, ("IMAGE",)),
        "ImageBlur": NodeSpec(
            {"image": ("IMAGE",), "blur_radius": (_INT, 1, 31, 1), "sigma": (_FLOAT,)}, ("IMAGE",)
        ),
        "LoadImage": NodeSpec({"image": (_IMAGE_FILE,)}, ("IMAGE", "MASK")),
        "LoadImageMask": NodeSpec(
            {"image": (_IMAGE_FILE,), "channel": (_COMBO, ("alpha", "red", "green", "blue"))}, ("MASK",)
        ),
        "PrimitiveString": NodeSpec({"value": (_STRING,)}, ("STRING",)),
        "PrimitiveInt": NodeSpec({"value": (_INT, -(2**63) + 1, 2**63 - 1, 0)}, ("INT",)),
        "MaskToImage": NodeSpec({"mask": ("MASK",)}, ("IMAGE",)),
        "ImageToMask": NodeSpec(
            {"image": ("IMAGE",), "channel": (_COMBO, ("red", "green", "blue", "alpha"))}, ("MASK",)
        ),
        "ImageScale": NodeSpec(
            {
                "image": ("IMAGE",),
                "upscale_method": (_COMBO, ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")),
                "width": (_INT, 0, 16384, 512),
                "height": (_INT, 0, 16384, 512),
                "crop": (_COMBO, ("disabled", "center")),
            },
            ("IMAGE",),
        ),
        "VAEEncode": NodeSpec({"pixels": ("IMAGE",), "vae": ("VAE",)}, ("LATENT",)),
        "SetLatentNoiseMask": NodeSpec({"samples": ("LATENT",), "mask": ("MASK",)}, ("LATENT",)),
        "RepeatLatentBatch": NodeSpec({"samples": ("LATENT",), "amount": (_INT, 1, 64, 1)}, ("LATENT",)),
        "SaveImage": NodeSpec({"images": ("IMAGE",), "filename_prefix": (_STRING,)}, (), True),
        "PreviewImage": NodeSpec({"images": ("IMAGE",)}, (), True),
        "SaveImageWebsocket": NodeSpec({"images": ("IMAGE",)}, (), True),
        "SaveLatent": NodeSpec({"samples": ("LATENT",), "filename_prefix": (_STRING,)}, (), True),
        "CheckpointLoaderSimple": NodeSpec({"ckpt_name": (_COMBO, checkpoints)}, ("MODEL", "CLIP", "VAE")),
        "CLIPTextEncode": NodeSpec({"text": (_STRING,), "clip": ("CLIP",)}, ("CONDITIONING",)),
        "EmptyLatentImage": NodeSpec(
            {"width": latent_size, "height": latent_size, "batch_size": (_INT, 1, 4096, 1)}, ("LATENT",)
        ),
        "EmptySD3LatentImage": NodeSpec(
            {"width": latent_size, "height": latent_size, "batch_size": (_INT, 1, 4096, 1)}, ("LATENT",)
        ),
        "KSampler": NodeSpec(
            {
                "model": ("MODEL",),
                "seed": (_INT, 0, 0xFFFFFFFFFFFFFFFF, 0),
                "steps": (_INT, 1, 10000, 20),
                "cfg": (_FLOAT,),
                "sampler_name": (_COMBO, ("euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde")),
                "scheduler": (_COMBO, ("normal", "karras", "simple", "sgm_uniform")),
                "positive": ("CONDITIONING",),
                "negative": ("CONDITIONING",),
                "latent_image": ("LATENT",),
                "denoise": (_FLOAT,),
            },
            ("LATENT",),
        ),
        "VAEDecode": NodeSpec({"samples": ("LATENT",), "vae": ("VAE",)}, ("IMAGE",)),
    }


# --- public records ---------------------------------------------------------------------


@dataclass
class Plan:
    """What the fake GPU does with one prompt."""

    duration: float = 0.02  # seconds of work: shared by the samplers, else by all nodes that run
    outcome: str = "success"  # success | error
    exception_type: str = "Exception"
    exception_message: str = "fake failure"
    error_node: str | None = None  # default: the sampler for OOM, else the last node that runs

    @classmethod
    def disk_full(cls) -> Plan:
        """What a real 0.3.64 reports, in its history and on the socket, when SaveImage's write
        meets a full disk (its output directory on a full filesystem; PIL's save raises it)."""
        return cls(
            outcome="error",
            exception_type="OSError",
            exception_message="[Errno 28] No space left on device\n",
        )


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str  # without the /api prefix
    query: dict[str, str]
    body: Any  # parsed JSON, raw text, or None
    headers: dict[str, str]
    at: float  # loop.time()


@dataclass(frozen=True)
class RecordedInterrupt:
    prompt_id: str | None  # None = a bare, global interrupt
    running: str | None  # what was running when it arrived
    at: float


@dataclass(frozen=True)
class RecordedCancel:
    """One ``POST /api/jobs/{id}/cancel`` and what it did."""

    prompt_id: str
    outcome: str  # dequeued | interrupted | not_found
    at: float


@dataclass
class Execution:
    """One busy interval of the fake GPU."""

    prompt_id: str
    client_id: str | None
    start: float
    end: float | None = None
    outcome: str = "running"  # success | error | interrupted | lost


@dataclass
class _Item:
    number: float
    prompt_id: str
    graph: dict[str, Any]
    extra: dict[str, Any]
    outputs: list[str]

    def row(self) -> list[Any]:
        return [self.number, self.prompt_id, self.graph, self.extra, self.outputs]

    def __lt__(self, other: _Item) -> bool:
        return (self.number, self.prompt_id) < (other.number, other.prompt_id)


@dataclass
class _State:
    """Everything a restart forgets."""

    pending: list[_Item] = field(default_factory=list)
    running: _Item | None = None
    current_node: str | None = None
    history: dict[str, dict[str, Any]] = field(default_factory=dict)
    number: int = 0
    cache: dict[str, dict[str, Any] | None] = field(default_factory=dict)  # signature -> ui output
    interrupted: bool = False


class FakeComfyUI:
    def __init__(
        self,
        *,
        checkpoints: tuple[str, ...] = DEFAULT_CHECKPOINTS,
        default_duration: float = 0.02,
        jobs_api: bool = False,
    ):
        self.default_duration = default_duration
        self.jobs_api = jobs_api
        self.plan: Callable[[str, dict[str, Any]], Plan] | None = None
        self.history_delay = 0.0
        self.post_delay = 0.0
        self.frame_interval = 0.0
        self.latent_previews = False
        self.frames_sent: list[tuple[str, str, int]] = []
        self.refuse_websockets = False
        self.mute_events = False
        self.fail_next: dict[str, list[int]] = {}
        self.requests: list[RecordedRequest] = []
        self.interrupts: list[RecordedInterrupt] = []
        self.job_cancels: list[RecordedCancel] = []
        self.executions: list[Execution] = []
        self.max_queued_by_client: dict[str, int] = {}
        # (type, subfolder, filename) -> bytes; the input folder ships example.png, as ComfyUI does
        self.files: dict[tuple[str, str, str], bytes] = {("input", "", "example.png"): tiny_png((0, 0, 0))}
        self.nodes = _node_catalogue(checkpoints)
        self.version = VERSION  # what /system_stats reports
        self.honour_prompt_ids = True  # False: mint our own id, as servers before 0.3.56 could
        self.port = 0
        self._state = _State()
        self._sockets: dict[str, web.WebSocketResponse] = {}
        self._all_sockets: set[web.WebSocketResponse] = set()
        self._stalled: set[web.WebSocketResponse] = set()  # open but silent, see stall_sockets()
        self._preview_metadata: set[str] = set()  # sids whose first frame asked for type 4 previews
        self.socket_connects = 0
        self._work = asyncio.Event()
        self._paused = False
        self._runner: web.AppRunner | None = None
        self._executor: asyncio.Task[None] | None = None

    # --- lifecycle ------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application(middlewares=[self._record, self._origin_check, self._injected_failures])
        for prefix in ("", "/api"):
            app.router.add_get(f"{prefix}/ws", self._ws)
            app.router.add_post(f"{prefix}/prompt", self._post_prompt)
            app.router.add_get(f"{prefix}/prompt", self._get_prompt)
            app.router.add_get(f"{prefix}/queue", self._get_queue)
            app.router.add_post(f"{prefix}/queue", self._post_queue)
            app.router.add_post(f"{prefix}/interrupt", self._post_interrupt)
            app.router.add_get(f"{prefix}/history", self._get_history_all)
            app.router.add_get(f"{prefix}/history/{{prompt_id}}", self._get_history)
            app.router.add_post(f"{prefix}/history", self._post_history)
            app.router.add_get(f"{prefix}/view", self._view)
            app.router.add_post(f"{prefix}/upload/image", self._upload_image)
            app.router.add_get(f"{prefix}/system_stats", self._system_stats)
            app.router.add_get(f"{prefix}/object_info", self._object_info)
            app.router.add_get(f"{prefix}/object_info/{{node_class}}", self._object_info)
            app.router.add_get(f"{prefix}/features", self._features)
            app.router.add_post(f"{prefix}/free", self._free)
        if self.jobs_api:
            app.router.add_post("/api/jobs/{prompt_id}/cancel", self._post_job_cancel)
        app.router.add_get("/{path:.*}", self._static)  # the frontend: GET only, so other methods get 405
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self._executor = asyncio.create_task(self._execute_forever(), name="fake-comfyui-executor")

    async def __aenter__(self) -> FakeComfyUI:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Kill the process: connections are refused; queue, history, cache and sockets are gone.

        ``start()`` brings it back on the same port, empty, as a restarted ComfyUI.
        """
        if self._executor is not None:
            self._executor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._executor
            self._executor = None
        await self.drop_sockets()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for run in self.executions:
            if run.end is None:
                run.end, run.outcome = asyncio.get_running_loop().time(), "lost"
        self._state = _State()
        self.files = {key: data for key, data in self.files.items() if key[0] != "temp"}

    @property
    def stopped(self) -> bool:
        return self._runner is None

    async def restart(self, down_for: float = 0.0) -> None:
        """Kill and start again on the same port: queue, history, cache and sockets are gone."""
        await self.stop()
        await asyncio.sleep(down_for)
        await self.start()

    async def submit_foreign(self, duration: float, client_id: str | None = "comfyui-frontend") -> str:
        """Queue a prompt as someone else would (the ComfyUI UI, another tool); returns its id."""
        size = {"width": 8, "height": 8, "batch_size": 1, "color": 1}
        prefix = f"ui/{uuid.uuid4().hex[:8]}/[fake:duration={duration}]"  # unique: never served from cache
        graph = {
            "1": {"class_type": "EmptyImage", "inputs": size},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
        }
        body: dict[str, Any] = {"prompt": graph}
        if client_id is not None:
            body["client_id"] = client_id
        async with ClientSession() as http, http.post(f"{self.url}/prompt", json=body) as answer:
            assert answer.status == 200, await answer.text()
            return str((await answer.json())["prompt_id"])

    async def drop_sockets(self) -> None:
        """Close every websocket from the server side (the clients see a drop)."""
        for ws in list(self._all_sockets):
            await ws.close(code=1001, message=b"going away")
        self._sockets.clear()

    async def broadcast(self, event: str, data: dict[str, Any]) -> None:
        """Send any message to every socket, as custom nodes do (e.g. ``crystools.monitor``)."""
        for ws in list(self._sockets.values()):
            await self._send_to(ws, event, data)

    def stall_sockets(self) -> None:
        """The open sockets go silent (no events, no pongs) but stay open, as behind a cut-off
        network path; sockets opened afterwards work."""
        self._stalled |= self._all_sockets

    def pause(self) -> None:
        """Stop taking new prompts from the queue (the running one finishes)."""
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self._work.set()

    # --- instrumentation ------------------------------------------------------------

    def calls(self, method: str, path: str) -> list[RecordedRequest]:
        """Recorded requests with this method whose path (without ``/api``) starts with ``path``."""
        return [r for r in self.requests if r.method == method and r.path.startswith(path)]

    def busy_intervals(self) -> list[tuple[float, float]]:
        return [(run.start, run.end) for run in self.executions if run.end is not None]

    def idle_gaps(self) -> list[float]:
        """Idle time between consecutive executions of the fake GPU (loop.time() seconds)."""
        spans = sorted(self.busy_intervals())
        return [max(0.0, nxt[0] - cur[1]) for cur, nxt in itertools.pairwise(spans)]

    @property
    def running_prompt(self) -> str | None:
        return self._state.running.prompt_id if self._state.running else None

    @property
    def pending_prompts(self) -> list[str]:
        return [item.prompt_id for item in sorted(self._state.pending)]

    def history_entry(self, prompt_id: str) -> dict[str, Any] | None:
        return self._state.history.get(prompt_id)

    async def wait_until(self, predicate: Callable[[], bool], within: float = 5.0) -> None:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + within
        while not predicate():
            if loop.time() > give_up:
                raise AssertionError("fake ComfyUI: condition not reached in time")
            await asyncio.sleep(0.002)

    async def wait_running(self, within: float = 5.0) -> str:
        """The id of the running prompt, once one runs."""
        await self.wait_until(lambda: self._state.running is not None, within)
        assert self._state.running is not None
        return self._state.running.prompt_id

    # --- middlewares ----------------------------------------------------------------

    @web.middleware
    async def _record(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        raw = await request.read()
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode("utf-8", "replace")
        self.requests.append(
            RecordedRequest(
                method=request.method,
                path=_route(request.path),
                query=dict(request.query),
                body=body,
                headers=dict(request.headers),
                at=asyncio.get_running_loop().time(),
            )
        )
        return await handler(request)

    @web.middleware
    async def _origin_check(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        host, origin = request.headers.get("Host"), request.headers.get("Origin")
        if host and origin:
            host_parts, origin_parts = urlsplit(f"//{host}"), urlsplit(origin)
            loopback = host_parts.hostname in ("localhost", "127.0.0.1", "::1")
            ports_differ = bool(
                host_parts.port and origin_parts.port and host_parts.port != origin_parts.port
            )
            if loopback and (host_parts.hostname != origin_parts.hostname or ports_differ):
                return web.Response(status=403)
        return await handler(request)

    @web.middleware
    async def _injected_failures(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        statuses = self.fail_next.get(_route(request.path))
        if statuses:
            return web.Response(status=statuses.pop(0), text="injected failure")
        return await handler(request)

    # --- websocket ------------------------------------------------------------------

    async def _ws(self, request: web.Request) -> web.StreamResponse:
        if self.refuse_websockets:
            return web.Response(status=503)
        # Like ComfyUI: no heartbeat, the client must ping; pongs by hand for ``stall_sockets``.
        ws = web.WebSocketResponse(autoping=False)
        await ws.prepare(request)
        sid = request.query.get("clientId") or uuid.uuid4().hex
        self.socket_connects += 1
        self._sockets[sid] = ws  # last one wins; the old socket stays open but gets nothing
        self._preview_metadata.discard(sid)
        self._all_sockets.add(ws)
        await self._send_to(ws, "status", {"status": self._exec_info(), "sid": sid})
        state = self._state
        if state.running and state.running.extra.get("client_id") == sid and state.current_node:
            # On reconnect: the current node only, no prompt_id.
            await self._send_to(ws, "executing", {"node": state.current_node})
        first = True
        try:
            async for msg in ws:
                if msg.type == WSMsgType.PING:
                    if ws not in self._stalled:
                        await ws.pong(msg.data)
                    continue
                if msg.type == WSMsgType.TEXT and first:
                    with contextlib.suppress(ValueError):
                        data = json.loads(msg.data)
                        if isinstance(data, dict) and data.get("type") == "feature_flags":
                            asked = data.get("data")
                            if isinstance(asked, dict) and asked.get("supports_preview_metadata"):
                                self._preview_metadata.add(sid)
                            flags = {"supports_preview_metadata": True, "max_upload_size": 104857600}
                            await self._send_to(ws, "feature_flags", flags)
                first = False
        finally:
            # ComfyUI's own bug, reproduced: this removes the sid even if a newer socket took it.
            self._sockets.pop(sid, None)
            self._all_sockets.discard(ws)
            self._stalled.discard(ws)
        return ws

    async def _send_to(self, ws: web.WebSocketResponse, event: str, data: dict[str, Any]) -> None:
        if ws in self._stalled:
            return
        with contextlib.suppress(ConnectionError, RuntimeError):
            await ws.send_str(json.dumps({"type": event, "data": data}))

    async def _send(self, event: str, data: dict[str, Any], sid: str | None) -> None:
        """``send_sync`` routing: sid None broadcasts, except events sent to nobody then."""
        if self.mute_events:
            return
        if sid is None:
            if event in _EXECUTION_ONLY:
                return
            for ws in list(self._sockets.values()):
                await self._send_to(ws, event, data)
        elif (target := self._sockets.get(sid)) is not None:
            await self._send_to(target, event, data)

    async def _send_binary(self, payload: bytes, sid: str | None) -> None:
        if self.mute_events:
            return
        targets = (
            list(self._sockets.values())
            if sid is None
            else [self._sockets[sid]]
            if sid in self._sockets
            else []
        )
        for ws in targets:
            if ws in self._stalled:
                continue
            with contextlib.suppress(ConnectionError, RuntimeError):
                await ws.send_bytes(payload)

    async def _broadcast_status(self) -> None:
        await self._send("status", {"status": self._exec_info()}, None)

    def _exec_info(self) -> dict[str, Any]:
        remaining = len(self._state.pending) + (1 if self._state.running else 0)
        return {"exec_info": {"queue_remaining": remaining}}

    # --- HTTP handlers ----------------------------------------------------------------

    async def _post_prompt(self, request: web.Request) -> web.Response:
        data = await request.json()  # not JSON -> aiohttp's text/plain 500, like ComfyUI
        if self.post_delay:
            await asyncio.sleep(self.post_delay)  # a slow server: the prompt lands only after this
        state = self._state
        if "number" in data:
            number: float = float(data["number"])
        else:
            number = -state.number if data.get("front") else state.number
            state.number += 1
        if "prompt" not in data:
            missing = {"type": "no_prompt", "message": "No prompt provided", "details": "No prompt provided"}
            return web.json_response({"error": {**missing, "extra_info": {}}, "node_errors": {}}, status=400)
        graph = data["prompt"]
        if not isinstance(graph, dict):
            raise web.HTTPInternalServerError(
                text="500 Internal Server Error\n\nServer got itself in trouble"
            )
        prompt_id = str((self.honour_prompt_ids and data.get("prompt_id")) or uuid.uuid4())
        error, node_errors, outputs = self._validate(graph)
        if error is not None:
            return web.json_response({"error": error, "node_errors": node_errors}, status=400)
        extra = dict(data.get("extra_data") or {})
        if "client_id" in data:
            extra["client_id"] = data["client_id"]
        heapq.heappush(state.pending, _Item(number, prompt_id, graph, extra, outputs))
        self._note_depth(extra.get("client_id"))
        await self._broadcast_status()
        self._work.set()
        return web.json_response({"prompt_id": prompt_id, "number": number, "node_errors": node_errors})

    async def _get_prompt(self, request: web.Request) -> web.Response:
        return web.json_response(self._exec_info())

    async def _get_queue(self, request: web.Request) -> web.Response:
        running = [self._state.running.row()] if self._state.running else []
        return web.json_response(
            {"queue_running": running, "queue_pending": [item.row() for item in self._state.pending]}
        )

    async def _post_queue(self, request: web.Request) -> web.Response:
        data = await request.json()
        state = self._state
        before = len(state.pending)
        if data.get("clear"):
            state.pending.clear()
        ids = set(data.get("delete") or [])
        if ids:
            state.pending = [item for item in state.pending if item.prompt_id not in ids]
            heapq.heapify(state.pending)
        if len(state.pending) != before:
            await self._broadcast_status()
        return web.Response()

    async def _post_interrupt(self, request: web.Request) -> web.Response:
        try:
            data = await request.json()
        except ValueError:
            data = {}
        prompt_id = data.get("prompt_id") if isinstance(data, dict) else None
        running = self.running_prompt
        loop = asyncio.get_running_loop()
        self.interrupts.append(RecordedInterrupt(prompt_id, running, loop.time()))
        if prompt_id is None or prompt_id == running:
            self._state.interrupted = True
        return web.Response()

    async def _post_job_cancel(self, request: web.Request) -> web.Response:
        """The Jobs API cancel: dequeue or interrupt in one step, idempotent."""
        prompt_id = request.match_info["prompt_id"]
        state = self._state
        outcome = "not_found"
        if any(item.prompt_id == prompt_id for item in state.pending):
            state.pending = [item for item in state.pending if item.prompt_id != prompt_id]
            heapq.heapify(state.pending)
            outcome = "dequeued"
            await self._broadcast_status()
        elif self.running_prompt == prompt_id:
            state.interrupted = True
            outcome = "interrupted"
        self.job_cancels.append(RecordedCancel(prompt_id, outcome, asyncio.get_running_loop().time()))
        return web.json_response({"cancelled": outcome != "not_found"})

    async def _static(self, request: web.Request) -> web.Response:
        return web.Response(status=404, text="404: Not Found")

    async def _get_history_all(self, request: web.Request) -> web.Response:
        items = list(self._state.history.items())
        if "max_items" in request.query:
            items = items[-int(request.query["max_items"]) :]
        return web.json_response(dict(items))

    async def _get_history(self, request: web.Request) -> web.Response:
        prompt_id = request.match_info["prompt_id"]
        entry = self._state.history.get(prompt_id)
        return web.json_response({prompt_id: entry} if entry is not None else {})

    async def _post_history(self, request: web.Request) -> web.Response:
        data = await request.json()
        if data.get("clear"):
            self._state.history.clear()
        for prompt_id in data.get("delete") or []:
            self._state.history.pop(prompt_id, None)
        return web.Response()

    async def _view(self, request: web.Request) -> web.Response:
        filename = request.query.get("filename", "")
        kind = request.query.get("type", "output")
        if filename.endswith("]") and " [" in filename:
            filename, _, annotation = filename[:-1].rpartition(" [")
            kind = annotation
        subfolder = request.query.get("subfolder", "")
        if not filename or filename.startswith("/") or ".." in filename:
            return web.Response(status=400)
        if subfolder.startswith("/") or posixpath.normpath(subfolder or ".").startswith(".."):
            return web.Response(status=403)
        data = self.files.get((kind, posixpath.normpath(subfolder) if subfolder else "", filename))
        if data is None:
            return web.Response(status=404)
        mime = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        headers = {"Content-Disposition": f'filename="{filename}"'}
        return web.Response(body=data, content_type=mime, headers=headers)

    async def _upload_image(self, request: web.Request) -> web.Response:
        """``server.py`` ``image_upload``: multipart in, ``{"name", "subfolder", "type"}`` out."""
        form = _multipart(request.headers.get("Content-Type", ""), await request.read())
        image = form.get("image")
        if image is None or not image[0]:
            return web.Response(status=400)
        filename, data = image[0], image[1]
        kind = (form.get("type") or (None, b""))[1].decode() or "input"
        if kind not in ("input", "temp", "output"):
            kind = "input"
        subfolder = (form.get("subfolder") or (None, b""))[1].decode()
        overwrite = (form.get("overwrite") or (None, b""))[1].decode() in ("true", "1")
        stem, ext = posixpath.splitext(filename)
        counter = 1
        while True:
            path = posixpath.normpath(posixpath.join(subfolder or ".", filename))
            if path.startswith(("/", "../")) or path in ("..", "."):
                return web.Response(status=400)  # os.path.commonpath: outside the upload directory
            key = (kind, posixpath.dirname(path), posixpath.basename(path))
            if overwrite or key not in self.files or self.files[key] == data:
                break
            filename = f"{stem} ({counter}){ext}"
            counter += 1
        self.files[key] = data
        return web.json_response({"name": filename, "subfolder": subfolder, "type": kind})

    def _input_file(self, value: str) -> bytes | None:
        """``folder_paths.get_annotated_filepath``: ``name [output]`` or a name in the input folder."""
        kind = "input"
        for annotation in ("input", "output", "temp"):
            if value.endswith(f" [{annotation}]"):
                value, kind = value.removesuffix(f" [{annotation}]"), annotation
        path = posixpath.normpath(value)
        return self.files.get((kind, posixpath.dirname(path), posixpath.basename(path)))

    async def _system_stats(self, request: web.Request) -> web.Response:
        system = {
            "os": "posix",
            "ram_total": 25276063744,
            "ram_free": 22746112000,
            "comfyui_version": self.version,
            "python_version": "3.11.7",
            "pytorch_version": "2.8.0+cu128",
            "embedded_python": False,
            "argv": ["main.py", "--listen", "127.0.0.1", "--port", str(self.port)],
        }
        device = {"name": "cpu", "type": "cpu", "index": None, "vram_total": 0, "vram_free": 0}
        return web.json_response({"system": system, "devices": [device]})

    async def _object_info(self, request: web.Request) -> web.Response:
        """Node input specs as ComfyUI lists them; unknown classes answer ``{}``."""
        wanted = request.match_info.get("node_class")
        names = [wanted] if wanted else list(self.nodes)
        files = sorted(name for (kind, sub, name) in self.files if kind == "input" and sub == "")
        return web.json_response({n: _object_info(n, self.nodes[n], files) for n in names if n in self.nodes})

    async def _features(self, request: web.Request) -> web.Response:
        return web.json_response({"supports_preview_metadata": True, "max_upload_size": 104857600})

    async def _free(self, request: web.Request) -> web.Response:
        return web.Response()

    # --- validation (execution.validate_prompt) ----------------------------------------

    def _validate(self, graph: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any], list[str]]:
        """(error or None, node_errors, outputs to execute), shaped like ComfyUI's answers."""
        for node_id, node in graph.items():
            if not isinstance(node, dict) or "class_type" not in node:
                message = "Cannot execute because a node is missing the class_type property."
                return _error("invalid_prompt", message, f"Node ID '#{node_id}'"), {}, []
            if node["class_type"] not in self.nodes:
                message = f"Cannot execute because node {node['class_type']} does not exist."
                return _error("invalid_prompt", message, f"Node ID '#{node_id}'"), {}, []
        outputs = [nid for nid, node in graph.items() if self.nodes[node["class_type"]].output_node]
        if not outputs:
            return _error("prompt_no_outputs", "Prompt has no outputs", ""), {}, []
        node_errors: dict[str, Any] = {}
        good: list[str] = []
        own_reasons: list[str] = []
        for output in outputs:
            failing = self._validate_node(graph, output, set())
            if not failing:
                good.append(output)
                continue
            for node_id, errors in failing.items():
                entry = node_errors.setdefault(
                    node_id,
                    {"errors": errors, "dependent_outputs": [], "class_type": graph[node_id]["class_type"]},
                )
                entry["dependent_outputs"].append(output)
                if node_id == output:
                    own_reasons += [f"{e['message']}: {e['details']}" for e in errors]
        if not good:
            error = _error(
                "prompt_outputs_failed_validation", "Prompt outputs failed validation", "\n".join(own_reasons)
            )
            return error, node_errors, []
        return None, node_errors, good

    def _validate_node(
        self, graph: dict[str, Any], node_id: str, seen: set[str]
    ) -> dict[str, list[dict[str, Any]]]:
        if node_id in seen:
            return {}
        seen.add(node_id)
        node = graph[node_id]
        spec = self.nodes[node["class_type"]]
        inputs = node.get("inputs", {})
        errors: list[dict[str, Any]] = []
        failing: dict[str, list[dict[str, Any]]] = {}
        for name, kind in spec.inputs.items():
            if name not in inputs:
                if name == "denoise":
                    continue
                errors.append(_node_error("required_input_missing", "Required input is missing", name, name))
                continue
            value = inputs[name]
            config = (
                [kind[0], {"default": kind[3], "min": kind[1], "max": kind[2], "step": 1}]
                if kind[0] == _INT
                else None
            )
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                if value[0] not in graph:
                    err = _node_error(
                        "exception_during_validation", "Exception when validating node", f"'{value[0]}'", None
                    )
                    err["extra_info"] = {
                        "exception_type": "KeyError",
                        "traceback": ['  File "execution.py", line 788\n'],
                    }
                    errors.append(err)
                    continue
                upstream = self.nodes.get(graph[value[0]].get("class_type", ""))
                received = (
                    upstream.outputs[value[1]] if upstream and value[1] < len(upstream.outputs) else "*"
                )
                if kind[0] not in (_INT, _FLOAT, _STRING, _COMBO) and received != kind[0]:
                    details = f"{name}, received_type({received}) mismatch input_type({kind[0]})"
                    err = _node_error(
                        "return_type_mismatch", "Return type mismatch between linked nodes", details, name
                    )
                    err["extra_info"].update(received_type=received, linked_node=value)
                    errors.append(err)
                    continue
                failing.update(self._validate_node(graph, value[0], seen))
            elif kind[0] == _INT:
                try:
                    number = int(value)
                except (TypeError, ValueError) as exc:
                    details = f"{name}, {value}, {exc}"
                    err = _node_error(
                        "invalid_input_type",
                        "Failed to convert an input value to a INT value",
                        details,
                        name,
                    )
                    err["extra_info"].update(
                        input_config=config, received_value=value, exception_message=str(exc)
                    )
                    errors.append(err)
                    continue
                if number < kind[1] or number > kind[2]:
                    smaller = number < kind[1]
                    if smaller:
                        err = _node_error(
                            "value_smaller_than_min",
                            f"Value {number} smaller than min of {kind[1]}",
                            name,
                            name,
                        )
                    else:
                        err = _node_error(
                            "value_bigger_than_max",
                            f"Value {number} bigger than max of {kind[2]}",
                            name,
                            name,
                        )
                    err["extra_info"].update(input_config=config, received_value=value)
                    errors.append(err)
            elif kind[0] == _IMAGE_FILE and (not isinstance(value, str) or self._input_file(value) is None):
                err = _node_error(
                    "custom_validation_failed",
                    "Custom validation failed for node",
                    f"{name} - Invalid image file: {value}",
                    name,
                )
                errors.append(err)
            elif kind[0] == _COMBO and value not in kind[1]:
                details = f"{name}: '{value}' not in {list(kind[1])}"
                err = _node_error("value_not_in_list", "Value not in list", details, name)
                options = list(kind[1])
                err["extra_info"].update(
                    input_config=[options] if len(options) <= 20 else None, received_value=value
                )
                errors.append(err)
        if errors:
            failing[node_id] = errors
        return failing

    # --- the fake GPU -----------------------------------------------------------------

    def _note_depth(self, client_id: str | None) -> None:
        if client_id is None:
            return
        items = [*self._state.pending, *([self._state.running] if self._state.running else [])]
        depth = sum(1 for item in items if item.extra.get("client_id") == client_id)
        self.max_queued_by_client[client_id] = max(self.max_queued_by_client.get(client_id, 0), depth)

    async def _execute_forever(self) -> None:
        while True:
            while self._paused or not self._state.pending:
                self._work.clear()
                await self._work.wait()
            state = self._state
            state.running = heapq.heappop(state.pending)
            state.interrupted = False
            await self._broadcast_status()
            await self._execute(state, state.running)

    async def _execute(self, state: _State, item: _Item) -> None:
        loop = asyncio.get_running_loop()
        sid = item.extra.get("client_id")
        pid = item.prompt_id
        run = Execution(pid, sid, start=loop.time())
        self.executions.append(run)
        messages: list[list[Any]] = []

        async def event(kind: str, data: dict[str, Any], keep: bool = False) -> None:
            if keep:
                messages.append([kind, data])
            await self._send(kind, data, sid)

        await event("execution_start", {"prompt_id": pid, "timestamp": _ms()}, keep=True)
        order = _topological(item.graph, item.outputs)
        signatures = {nid: _signature(item.graph, nid) for nid in order}
        # SaveImageWebsocket's IS_CHANGED returns the time: it runs again on every prompt.
        cached = [
            nid
            for nid in order
            if signatures[nid] in state.cache and item.graph[nid]["class_type"] != "SaveImageWebsocket"
        ]
        await event("execution_cached", {"nodes": cached, "prompt_id": pid, "timestamp": _ms()}, keep=True)
        plan = (
            self.plan(pid, item.graph) if self.plan else _plan_from_markers(item.graph, self.default_duration)
        )
        to_run = [nid for nid in order if nid not in cached]
        error_node = plan.error_node or _default_error_node(item.graph, to_run, plan)
        # Sampling dominates GPU time: samplers share the duration, other nodes take 1 ms.
        samplers = [nid for nid in to_run if item.graph[nid]["class_type"] == "KSampler"]
        per_node = plan.duration / max(len(samplers or to_run), 1)
        progress: dict[str, dict[str, Any]] = {}
        outputs: dict[str, Any] = {}
        new_cache: dict[str, dict[str, Any] | None] = {}
        executed: list[str] = []
        outcome = "success"

        async def node_state(nid: str, value: float, maximum: float, status: str) -> None:
            progress[nid] = {
                "value": value,
                "max": maximum,
                "state": status,
                "node_id": nid,
                "prompt_id": pid,
                "display_node_id": nid,
                "parent_node_id": None,
                "real_node_id": nid,
            }
            await self._send("progress_state", {"prompt_id": pid, "nodes": dict(progress)}, sid)

        for nid in order:
            node = item.graph[nid]
            if nid in cached:
                ui = state.cache[signatures[nid]]
                new_cache[signatures[nid]] = ui
                if ui is not None:
                    outputs[nid] = ui
                    await event(
                        "executed", {"node": nid, "display_node": nid, "output": ui, "prompt_id": pid}
                    )
                    await node_state(nid, 1.0, 1.0, "finished")
                continue
            if state.interrupted:
                outcome = "interrupted"
                break
            state.current_node = nid
            await node_state(nid, 0.0, 1.0, "running")
            await event("executing", {"node": nid, "display_node": nid, "prompt_id": pid})
            steps = node.get("inputs", {}).get("steps") if node["class_type"] == "KSampler" else None
            if isinstance(steps, int) and steps > 0:
                for step in range(1, steps + 1):
                    await asyncio.sleep(per_node / steps)
                    if state.interrupted:
                        outcome = "interrupted"
                        break
                    await node_state(nid, float(step), float(steps), "running")
                    data = {"value": step, "max": steps, "prompt_id": pid, "node": nid}
                    if self.latent_previews:
                        await self._send_frame(pid, nid, sid, data, latent_preview(item.graph, nid, step))
                    else:
                        await self._send("progress", data, sid)
                if outcome == "interrupted":
                    break
            else:
                await asyncio.sleep(0.001 if samplers else per_node)
            failure = None
            if plan.outcome == "error" and nid == error_node:
                failure = (plan.exception_type, plan.exception_message)
            ui = None
            if failure is None:
                try:
                    ui = await self._run_output_node(item, nid, sid, node_state)
                except _NodeFailure as exc:
                    failure = ("Exception", str(exc))
            if failure is not None:
                outcome = "error"
                await event(
                    "execution_error",
                    {
                        "prompt_id": pid,
                        "node_id": nid,
                        "node_type": node["class_type"],
                        "executed": executed,
                        "exception_message": failure[1],
                        "exception_type": failure[0],
                        "traceback": [
                            '  File "<comfyui-root>/execution.py", line 496, in execute\n    raise\n'
                        ],
                        "current_inputs": {k: [repr(v) * 50] for k, v in node.get("inputs", {}).items()},
                        "current_outputs": order,
                        "timestamp": _ms(),
                    },
                    keep=True,
                )
                break
            if ui is not None:
                outputs[nid] = ui
                await event("executed", {"node": nid, "display_node": nid, "output": ui, "prompt_id": pid})
            await node_state(nid, 1.0, 1.0, "finished")
            executed.append(nid)
            new_cache[signatures[nid]] = ui
        state.current_node = None
        if outcome == "interrupted":
            stopped_at = next((nid for nid in order if nid not in cached and nid not in executed), None)
            data = {
                "prompt_id": pid,
                "node_id": stopped_at,
                "node_type": item.graph[stopped_at]["class_type"] if stopped_at else None,
                "executed": executed,
                "timestamp": _ms(),
            }
            messages.append(["execution_interrupted", data])
            await self._send("execution_interrupted", data, sid)  # broadcast when sid is None
        elif outcome == "success":
            await event("execution_success", {"prompt_id": pid, "timestamp": _ms()}, keep=True)
        run.end, run.outcome = loop.time(), outcome
        state.cache = new_cache
        if self.history_delay:
            await asyncio.sleep(self.history_delay)  # the real race: success sent, history not yet written
        state.history[pid] = {
            "prompt": item.row(),
            "outputs": _set_ordered(
                outputs if outcome == "success" else {k: v for k, v in outputs.items() if k in executed}
            ),
            "status": {
                "status_str": "success" if outcome == "success" else "error",
                "completed": outcome == "success",
                "messages": messages,
            },
            "meta": {
                nid: {"node_id": nid, "display_node": nid, "parent_node": None, "real_node_id": nid}
                for nid in outputs
            },
        }
        state.running = None
        await self._broadcast_status()
        await event("executing", {"node": None, "prompt_id": pid})

    async def _run_output_node(
        self,
        item: _Item,
        nid: str,
        sid: str | None,
        node_state: Callable[[str, float, float, str], Awaitable[None]],
    ) -> dict[str, Any] | None:
        node = item.graph[nid]
        class_type, inputs = node["class_type"], node.get("inputs", {})
        if class_type not in ("SaveImage", "PreviewImage", "SaveImageWebsocket", "SaveLatent"):
            return None
        batch = _batch_size(item.graph, nid)
        if class_type == "SaveImageWebsocket":
            # One full-size PNG per image through the progress hook, in ComfyUI's order: the
            # progress_state snapshot, then a client that negotiated preview metadata gets a
            # type 4 frame before ``progress``, any other a type 1 frame (format 2: PNG) after.
            for index in range(batch):
                if index and self.frame_interval:
                    await asyncio.sleep(self.frame_interval)
                self.frames_sent.append((item.prompt_id, nid, index))
                data = {"value": index, "max": batch, "prompt_id": item.prompt_id, "node": nid}
                await node_state(nid, float(index), float(batch), "running")
                await self._send_frame(item.prompt_id, nid, sid, data, self._png(item, nid, index))
            return None
        if class_type == "PreviewImage":
            kind, subfolder = "temp", ""
            base = f"ComfyUI_temp_{uuid.uuid4().hex[:5]}"
        else:
            kind = "output"
            prefix = str(inputs.get("filename_prefix", "ComfyUI"))
            subfolder, base = posixpath.split(prefix)
            normal = posixpath.normpath(subfolder) if subfolder else ""
            if prefix.startswith("/") or normal.startswith(".."):
                raise _NodeFailure(
                    "**** ERROR: Saving image outside the output folder is not allowed.\n"
                    " full_output_folder: <outside-output-dir>\n         output_dir: <output-dir>\n"
                    "         commonpath: <outside-output-dir>\n"
                )
            subfolder = normal
        ext = "latent" if class_type == "SaveLatent" else "png"
        pattern = re.compile(re.escape(base) + r"_(\d{5})_\." + ext + "$")
        taken = [
            int(m.group(1))
            for (t, sub, name) in self.files
            if t == kind and sub == subfolder
            for m in [pattern.match(name)]
            if m
        ]
        counter = max(taken, default=0) + 1
        if class_type == "SaveLatent":  # one safetensors file for the whole batch
            filename = f"{base}_{counter:05}_.latent"
            self.files[(kind, subfolder, filename)] = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "
            return {"latents": [{"filename": filename, "subfolder": subfolder, "type": kind}]}
        images = []
        for index in range(batch):
            filename = f"{base}_{counter + index:05}_.png"
            self.files[(kind, subfolder, filename)] = self._png(item, nid, index)
            images.append({"filename": filename, "subfolder": subfolder, "type": kind})
        return {"images": images}

    async def _send_frame(
        self, pid: str, nid: str, sid: str | None, progress: dict[str, Any], image: bytes
    ) -> None:
        """The progress hook with an image: a client that negotiated preview metadata gets a
        type 4 frame before ``progress``, any other a type 1 frame (format 1 JPEG, 2 PNG) after."""
        jpeg = image[:2] == b"\xff\xd8"
        if sid in self._preview_metadata:
            meta = {
                "node_id": nid, "prompt_id": pid, "display_node_id": nid, "parent_node_id": None,
                "real_node_id": nid, "image_type": "image/jpeg" if jpeg else "image/png",
            }  # fmt: skip
            body = json.dumps(meta).encode()
            await self._send_binary(struct.pack(">II", 4, len(body)) + body + image, sid)
            await self._send("progress", progress, sid)
        else:
            await self._send("progress", progress, sid)
            await self._send_binary(struct.pack(">II", 1, 1 if jpeg else 2) + image, sid)

    def _png(self, item: _Item, nid: str, index: int) -> bytes:
        link = item.graph[nid].get("inputs", {}).get("images")
        pixels = self._pixels(item.graph, link[0]) if isinstance(link, list) and len(link) == 2 else None
        if pixels is not None:
            out = io.BytesIO()
            pixels.save(out, "PNG")
            return out.getvalue()
        digest = zlib.crc32(f"{item.prompt_id}/{nid}/{index}".encode())
        color = _upstream_input(item.graph, nid, "color")
        rgb = int(color) if isinstance(color, int) else digest & 0xFFFFFF
        # The saved image has the size the graph asked for (EmptyImage or latent pixels).
        width, height = (_upstream_input(item.graph, nid, name) for name in ("width", "height"))
        size = (width, height) if isinstance(width, int) and isinstance(height, int) else (8, 8)
        return tiny_png(((rgb >> 16) & 255, (rgb >> 8) & 255, rgb & 255), *size)

    def _pixels(self, graph: dict[str, Any], nid: str) -> Image.Image | None:
        """The real image of a LoadImage -> ImageInvert / ImageScale chain, else None."""
        node = graph.get(nid, {})
        inputs = node.get("inputs", {})
        upstream = inputs.get("image")
        source = (
            self._pixels(graph, upstream[0]) if isinstance(upstream, list) and len(upstream) == 2 else None
        )
        if node.get("class_type") == "LoadImage":
            data = self._input_file(str(inputs.get("image")))
            if data is None:
                return None
            with Image.open(io.BytesIO(data)) as opened:
                return ImageOps.exif_transpose(opened).convert("RGB")
        if node.get("class_type") == "ImageInvert" and source is not None:
            return source.point(_INVERT * len(source.getbands()))
        if node.get("class_type") == "ImageScale" and source is not None:
            width, height = int(inputs.get("width", 0)), int(inputs.get("height", 0))
            return source.resize((width or source.width, height or source.height))
        return None


def latent_preview(graph: dict[str, Any], nid: str, step: int) -> bytes:
    """The JPEG a KSampler's step sends as its preview: latent-sized (1/8), darker to lighter."""
    width, height = (_upstream_input(graph, nid, name) for name in ("width", "height"))
    known = isinstance(width, int) and isinstance(height, int)
    size = (max(width // 8, 1), max(height // 8, 1)) if known else (8, 8)
    out = io.BytesIO()
    Image.new("RGB", size, (min(step * 10, 255),) * 3).save(out, format="JPEG", quality=95)
    return out.getvalue()


def _float32(value: float) -> float:
    return float(struct.unpack("f", struct.pack("f", value))[0])


# ImageInvert as ComfyUI computes it: float32 pixels v/255, 1 - v, then 255 * v truncated to a
# byte on save, so 200 becomes 54, not 55 (the real server's output, byte for byte).
_INVERT = [int(_float32(255 * _float32(1 - _float32(v / 255)))) for v in range(256)]


def _multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """A multipart/form-data body as ``{field: (filename, bytes)}``."""
    head = f"Content-Type: {content_type}\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in message.iter_parts() if message.is_multipart() else []:
        name = part.get_param("name", header="content-disposition")
        if isinstance(name, str):
            payload = part.get_payload(decode=True)
            fields[name] = (part.get_filename(), payload if isinstance(payload, bytes) else b"")
    return fields


class _NodeFailure(Exception):
    pass


def _object_info(name: str, spec: NodeSpec, inputs: list[str]) -> dict[str, Any]:
    required: dict[str, Any] = {}
    for input_name, kind in spec.inputs.items():
        if kind[0] == _IMAGE_FILE:
            required[input_name] = [inputs, {"image_upload": True}]
        elif kind[0] == _COMBO:
            required[input_name] = [list(kind[1]), {}]
        elif kind[0] == _INT:
            required[input_name] = [_INT, {"default": kind[3], "min": kind[1], "max": kind[2]}]
        else:
            required[input_name] = [kind[0], {}] if kind[0] in (_FLOAT, _STRING) else [kind[0]]
    return {
        "input": {"required": required},
        "output": list(spec.outputs),
        "name": name,
        "display_name": name,
        "output_node": spec.output_node,
    }


def _route(path: str) -> str:
    return path[4:] if path.startswith("/api/") else path


def _ms() -> int:
    return int(time.time() * 1000)


def _error(kind: str, message: str, details: str) -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": {}}


def _node_error(kind: str, message: str, details: str, input_name: str | None) -> dict[str, Any]:
    extra: dict[str, Any] = {"input_name": input_name} if input_name else {}
    return {"type": kind, "message": message, "details": details, "extra_info": extra}


def _links(node: dict[str, Any]) -> list[str]:
    return [
        v[0]
        for v in node.get("inputs", {}).values()
        if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str)
    ]


def _topological(graph: dict[str, Any], outputs: list[str]) -> list[str]:
    order: list[str] = []

    def visit(nid: str) -> None:
        if nid in order:
            return
        for upstream in _links(graph[nid]):
            visit(upstream)
        order.append(nid)

    for output in outputs:
        visit(output)
    # ComfyUI runs a ready output node before anything else ("ux friendly" pick), so a saver
    # fed straight from an input runs before a deeper one listed first.
    ran: list[str] = []
    while order:
        ready = [nid for nid in order if all(up in ran for up in _links(graph[nid]))]
        pick = next((nid for nid in ready if nid in outputs), ready[0])
        ran.append(pick)
        order.remove(pick)
    return ran


def _signature(graph: dict[str, Any], nid: str) -> str:
    """A node's cache key: its class and inputs, with links replaced by upstream keys."""
    node = graph[nid]
    inputs = {
        k: _signature(graph, v[0]) + f"#{v[1]}"
        if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str)
        else v
        for k, v in sorted(node.get("inputs", {}).items())
    }
    return json.dumps([node["class_type"], inputs], sort_keys=True, default=str)


def _upstream_input(graph: dict[str, Any], nid: str, name: str) -> Any:
    node = graph[nid]
    if name in node.get("inputs", {}):
        return node["inputs"][name]
    for upstream in _links(node):
        found = _upstream_input(graph, upstream, name)
        if found is not None:
            return found
    return None


def _batch_size(graph: dict[str, Any], nid: str) -> int:
    batch = _upstream_input(graph, nid, "batch_size")
    return batch if isinstance(batch, int) and batch > 0 else 1


def _plan_from_markers(graph: dict[str, Any], default_duration: float) -> Plan:
    plan = Plan(duration=default_duration)
    for node in graph.values():
        for value in node.get("inputs", {}).values():
            for name, arg in _MARKER.findall(value) if isinstance(value, str) else []:
                if name == "duration":
                    plan.duration = float(arg)
                elif name == "error":
                    plan.outcome = "error"
                    plan.exception_message = arg or "fake failure"
                elif name == "oom":
                    plan.outcome, plan.exception_type = "error", "torch.OutOfMemoryError"
                    plan.exception_message = OOM_MESSAGE
    return plan


def _default_error_node(graph: dict[str, Any], to_run: list[str], plan: Plan) -> str | None:
    if not to_run:
        return None
    samplers = [nid for nid in to_run if graph[nid]["class_type"] == "KSampler"]
    if "OutOfMemory" in plan.exception_type and samplers:
        return samplers[0]
    return to_run[-1]
