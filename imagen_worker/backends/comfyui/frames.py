"""``SaveImageWebsocket`` images: outputs that exist only as binary frames on our socket.

ComfyUI 0.3.64's ``SaveImageWebsocket`` writes nothing to disk or to ``history.outputs``: while
the node executes it pushes each image of its batch through the progress hook, as one frame to
the prompt's client (type 4 with JSON naming prompt and node when the socket asked for preview
metadata, else type 1, which belongs to the prompt and node executing at the time; see
``client.py``). Each frame follows a ``progress`` event whose ``max`` is the batch size. Nothing
is replayed on reconnect, so a frame missed is lost for good.

``SocketSaves`` keeps one prompt's frames from the savers of its graph as output files (spooled
to disk as they arrive, within the job's byte budget) and tells whether it holds all of them: a
saver counts as complete only when its whole run, from its ``executing`` event to the next one,
was seen on one unbroken connection, and it delivered as many frames as its ``progress`` events
announced. A prompt that succeeded with an incomplete saver cannot be collected (ComfyUI has
nothing left to fetch), so the job is retried and the prompt runs again.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagen_worker.backends.comfyui.client import PREVIEW, SOCKET_CONNECTED, SOCKET_DOWN, FileRef
from imagen_worker.errors import RetryableError

SAVER = "SaveImageWebsocket"
# FileRef.type of a frame: not a ComfyUI folder, the file is in our spool already.
SOCKET = "websocket"
_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg"}


def socket_savers(graph: Mapping[str, Any]) -> frozenset[str]:
    """The ids of the graph's ``SaveImageWebsocket`` nodes."""
    return frozenset(
        str(nid)
        for nid, node in graph.items()
        if isinstance(node, Mapping) and node.get("class_type") == SAVER
    )


@dataclass(frozen=True)
class Frame:
    """One image a saver sent, spooled to ``path``."""

    ref: FileRef
    path: Path
    mime_type: str
    size: int
    sha256: str


class SocketSaves:
    """The frames of one prompt's ``SaveImageWebsocket`` nodes (see module docstring)."""

    def __init__(self, graph: Mapping[str, Any], spool: Path, limit: int) -> None:
        self.nodes = socket_savers(graph)
        self.frames: list[Frame] = []
        self.bytes = 0
        self.over_limit = False
        self._spool = spool
        self._limit = limit
        self._open: str | None = None  # the saver executing now, seen from its start
        self._complete: set[str] = set()
        self._announced: dict[str, int] = {}  # node -> batch size its progress events gave
        self._dropped_during: set[str] = set()

    def __bool__(self) -> bool:
        return bool(self.nodes)

    async def feed(self, kind: str | None, data: Mapping[str, Any]) -> bool:
        """Take one socket event; True when it was a saver's frame (an output, not a preview)."""
        if kind == PREVIEW:
            node = data.get("node")
            if node not in self.nodes:
                return False
            await self._keep(str(node), data)
            return True
        if kind == "executing":
            self._close()
            node = data.get("node")
            if node is not None and str(node) in self.nodes:
                self._open = str(node)
        elif kind == "progress" and data.get("node") in self.nodes:
            maximum = data.get("max")
            if isinstance(maximum, int | float) and not isinstance(maximum, bool):
                node = str(data["node"])
                self._announced[node] = max(self._announced.get(node, 0), int(maximum))
        elif kind in (SOCKET_CONNECTED, SOCKET_DOWN) and self._open is not None:
            self._dropped_during.add(self._open)  # events of its run were missed
            self._open = None
        return False

    def missing(self) -> str | None:
        """None when every saver of the graph was seen whole; else what is missing, one clause."""
        self._close()
        for node in sorted(self.nodes):
            got = sum(frame.ref.node_id == node for frame in self.frames)
            if node in self._complete and got >= self._announced.get(node, 0):
                continue
            announced = self._announced.get(node)
            count = f"{got} of {announced}" if announced else f"{got}"
            if node in self._dropped_during or node not in self._complete:
                return (
                    f"the websocket dropped while {SAVER} node {node} was sending its images ({count} "
                    "received)"
                )
            return f"only {count} images of {SAVER} node {node} arrived"
        return None

    def raise_if_incomplete(self, instance: str, prompt_id: str) -> None:
        problem = self.missing()
        if problem is None:
            return
        raise RetryableError(
            f"ComfyUI finished prompt {prompt_id} but {problem}; ComfyUI sends those images only once, "
            "so the job runs again",
            detail={"instance": instance, "prompt_id": prompt_id, "savers": sorted(self.nodes)},
        )

    def discard(self) -> None:
        """Delete every spooled frame (the job failed, or the frames were not handed over)."""
        for frame in self.frames:
            frame.path.unlink(missing_ok=True)
        self.frames.clear()

    def _close(self) -> None:
        if self._open is not None:
            self._complete.add(self._open)
            self._open = None

    async def _keep(self, node: str, data: Mapping[str, Any]) -> None:
        image = data.get("image")
        if not isinstance(image, bytes) or not image or self.over_limit:
            return
        if self.bytes + len(image) > self._limit:
            self.over_limit = True  # reported when the outputs are collected; keep no more
            self.discard()
            return
        mime = str(data.get("mime_type") or "image/png")
        index = sum(frame.ref.node_id == node for frame in self.frames)
        name = f"{node}_{index + 1:05}_.{_EXTENSIONS.get(mime, 'png')}"
        path, digest = await asyncio.to_thread(_spool_file, self._spool, image)
        self.bytes += len(image)
        ref = FileRef(node_id=node, kind="images", filename=name, subfolder="", type=SOCKET)
        self.frames.append(Frame(ref=ref, path=path, mime_type=mime, size=len(image), sha256=digest))


def _spool_file(directory: Path, data: bytes) -> tuple[Path, str]:
    handle, name = tempfile.mkstemp(dir=directory, suffix=".frame")
    with os.fdopen(handle, "wb") as out:
        out.write(data)
    return Path(name), hashlib.sha256(data).hexdigest()
