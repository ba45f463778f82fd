"""Contract fixtures: each scenario runs against the fake and, when configured, the real server.

The fakes always run, so ``make test`` checks the scenarios on any machine. A real ComfyUI joins
when ``IMAGEN_TEST_COMFYUI_URL`` is set (and, for the full-disk scenarios, a second one that the
suite starts itself from ``IMAGEN_TEST_COMFYUI_HOME``, its ``src`` and ``venv``, with its output
directory on a full filesystem); a real Supabase Storage when ``IMAGEN_TEST_SUPABASE_URL``
and ``IMAGEN_TEST_SUPABASE_SERVICE_KEY`` are set (``make contract`` sets both). A scenario that
passes on the fake and fails on the real server means the fake lies: fix the fake.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.fakes.comfyui import FakeComfyUI, Plan
from tests.fakes.storage import FakeStorage


@dataclass
class ComfyPeer:
    kind: str  # "fake" | "real"
    url: str
    fake: FakeComfyUI | None = None

    def slow(self, seconds: float = 3.0) -> None:
        """Make the next prompts take a few seconds (the real server is slow by graph alone)."""
        if self.fake is not None:
            self.fake.default_duration = seconds


@dataclass
class StoragePeer:
    kind: str
    url: str  # the server root; the API is under /storage/v1
    service_key: str
    bucket: str


# Read at import: the suite-wide fixture that isolates tests clears IMAGEN_* before each test.
REAL_COMFYUI_URL = os.environ.get("IMAGEN_TEST_COMFYUI_URL", "").rstrip("/")
REAL_STORAGE_URL = os.environ.get("IMAGEN_TEST_SUPABASE_URL", "").rstrip("/").removesuffix("/storage/v1")
REAL_STORAGE_KEY = os.environ.get("IMAGEN_TEST_SUPABASE_SERVICE_KEY", "")
REAL_COMFYUI_HOME = os.environ.get("IMAGEN_TEST_COMFYUI_HOME", "")
# In a mount namespace of its own: a 2 MiB tmpfs on the output directory ($0), filled, then the
# server ("$@"), so every save meets ENOSPC from the kernel.
FULL_DISK = (
    'mount -t tmpfs -o size=2m tmpfs "$0" && (dd if=/dev/zero of="$0/filler" bs=64k 2>/dev/null; true) '
    '&& exec "$@"'
)


def _peers(real: bool) -> list[str]:
    return ["fake", "real"] if real else ["fake"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "comfy" in metafunc.fixturenames:
        metafunc.parametrize("comfy", _peers(bool(REAL_COMFYUI_URL)), indirect=True)
    if "full_disk_comfy" in metafunc.fixturenames:
        metafunc.parametrize("full_disk_comfy", _peers(bool(REAL_COMFYUI_HOME)), indirect=True)
    if "storage" in metafunc.fixturenames:
        real = bool(REAL_STORAGE_URL and REAL_STORAGE_KEY)
        metafunc.parametrize("storage", _peers(real), indirect=True)


@pytest.fixture
async def comfy(request: pytest.FixtureRequest) -> AsyncIterator[ComfyPeer]:
    if request.param == "real":
        yield ComfyPeer("real", REAL_COMFYUI_URL)
        return
    async with FakeComfyUI() as fake:
        yield ComfyPeer("fake", fake.url, fake)


@pytest.fixture
async def full_disk_comfy(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ComfyPeer]:
    """A ComfyUI whose disk is full: the fake told so, or a real server started here for it."""
    if request.param == "fake":
        async with FakeComfyUI() as fake:
            fake.plan = lambda _pid, _graph: Plan.disk_full()
            yield ComfyPeer("fake", fake.url, fake)
        return
    home = Path(REAL_COMFYUI_HOME)
    output = tmp_path / "output"
    output.mkdir()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = [str(home / "venv" / "bin" / "python"), "main.py", "--cpu", "--listen", "127.0.0.1",
              "--port", str(port), "--disable-auto-launch", "--output-directory", str(output)]  # fmt: skip
    log = (tmp_path / "comfyui.log").open("wb")
    proc = subprocess.Popen(
        ["unshare", "-rm", "sh", "-c", FULL_DISK, str(output), *server],
        cwd=home / "src",
        stdout=log,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url) as http:
            for _ in range(240):
                assert proc.poll() is None, (tmp_path / "comfyui.log").read_text()
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get("/system_stats")).status_code == 200:
                        break
                await asyncio.sleep(0.25)
        yield ComfyPeer("real", url)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture
async def storage(request: pytest.FixtureRequest) -> AsyncIterator[StoragePeer]:
    if request.param == "fake":
        async with FakeStorage() as fake:
            yield StoragePeer("fake", fake.url, fake.service_key, "imagen-generated")
        assert fake.errors == [], "the fake Storage API raised inside a handler"
        return
    url, key = REAL_STORAGE_URL, REAL_STORAGE_KEY
    bucket = f"contract-{uuid.uuid4().hex[:8]}"
    headers = {"Authorization": f"Bearer {key}", "apikey": key}
    async with httpx.AsyncClient(base_url=f"{url}/storage/v1", headers=headers) as admin:
        created = await admin.post("/bucket", json={"id": bucket, "name": bucket, "public": False})
        assert created.status_code == 200, created.text
        try:
            yield StoragePeer("real", url, key, bucket)
        finally:
            await admin.post(f"/bucket/{bucket}/empty")
            await admin.delete(f"/bucket/{bucket}")
