"""Contract fixtures: each scenario runs against the fake and, when configured, the real server.

The fakes always run, so ``make test`` checks the scenarios on any machine. A real ComfyUI joins
when ``IMAGEN_TEST_COMFYUI_URL`` is set; a real Supabase Storage when ``IMAGEN_TEST_SUPABASE_URL``
and ``IMAGEN_TEST_SUPABASE_SERVICE_KEY`` are set (``make contract`` sets both). For the full-disk
scenarios the suite starts a second real server of each kind itself, on a full filesystem, from
the build in ``IMAGEN_TEST_COMFYUI_HOME`` (``src``, ``venv``) and ``IMAGEN_TEST_STORAGE_HOME``
(``src``, ``node24``, ``storage.env``). A scenario that passes on the fake and fails on the real
server means the fake lies: fix the fake.
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
from tests.workers import on_a_full_disk


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
REAL_STORAGE_HOME = os.environ.get("IMAGEN_TEST_STORAGE_HOME", "")


def _peers(real: bool) -> list[str]:
    return ["fake", "real"] if real else ["fake"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "comfy" in metafunc.fixturenames:
        metafunc.parametrize("comfy", _peers(bool(REAL_COMFYUI_URL)), indirect=True)
    if "full_disk_comfy" in metafunc.fixturenames:
        metafunc.parametrize("full_disk_comfy", _peers(bool(REAL_COMFYUI_HOME)), indirect=True)
    if "full_disk_storage" in metafunc.fixturenames:
        real = bool(REAL_STORAGE_HOME and REAL_STORAGE_KEY)
        metafunc.parametrize("full_disk_storage", _peers(real), indirect=True)
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
    home, port = Path(REAL_COMFYUI_HOME), _free_port()
    output = tmp_path / "output"
    server = [str(home / "venv" / "bin" / "python"), "main.py", "--cpu", "--listen", "127.0.0.1",
              "--port", str(port), "--disable-auto-launch", "--output-directory", str(output)]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    async with _on_a_full_disk(server, output, home / "src", {}, f"{url}/system_stats", tmp_path):
        yield ComfyPeer("real", url)


@dataclass
class FullStorage:
    api: str  # the API's root: /bucket, /object/... (the real one without the proxy in front)
    service_key: str
    bucket: str


@pytest.fixture
async def full_disk_storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[FullStorage]:
    """A Storage whose file backend's disk is full: the fake told so, or a real API started here."""
    if request.param == "fake":
        async with FakeStorage() as fake:
            fake.fail_next(100, status="disk_full", methods=["PUT", "POST"])
            yield FullStorage(f"{fake.url}/storage/v1", fake.service_key, "imagen-generated")
        return
    home, port = Path(REAL_STORAGE_HOME), _free_port()
    data = tmp_path / "data"
    env = dict(_env_file(home / "storage.env"), SERVER_PORT=str(port))
    env.update(FILE_STORAGE_BACKEND_PATH=str(data), STORAGE_FILE_BACKEND_PATH=str(data))
    env["PATH"] = f"{home / 'node24' / 'bin'}:{os.environ['PATH']}"
    api = f"http://127.0.0.1:{port}"
    server = ["node", "dist/start/server.js"]
    async with _on_a_full_disk(server, data, home / "src", env, f"{api}/status", tmp_path):
        bucket = f"contract-full-{uuid.uuid4().hex[:8]}"
        headers = {"Authorization": f"Bearer {REAL_STORAGE_KEY}", "apikey": REAL_STORAGE_KEY}
        async with httpx.AsyncClient(base_url=api, headers=headers) as admin:
            created = await admin.post("/bucket", json={"id": bucket, "name": bucket, "public": False})
            assert created.status_code == 200, created.text
            try:
                yield FullStorage(api, REAL_STORAGE_KEY, bucket)
            finally:
                await admin.delete(f"/bucket/{bucket}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _env_file(path: Path) -> dict[str, str]:
    lines = (line.strip() for line in path.read_text().splitlines())
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


@contextlib.asynccontextmanager
async def _on_a_full_disk(
    command: list[str], mount: Path, cwd: Path, env: dict[str, str], ready: str, logs: Path
) -> AsyncIterator[None]:
    """``command`` in a mount namespace of its own where ``mount`` is a full filesystem; yields
    once ``ready`` answers 200, stops the server after."""
    mount.mkdir()
    log = (logs / f"{mount.name}-server.log").open("wb")
    proc = subprocess.Popen(
        [*on_a_full_disk(mount, "2m"), *command],
        cwd=cwd, env={**os.environ, **env}, stdout=log, stderr=log,
    )  # fmt: skip
    try:
        async with httpx.AsyncClient() as http:
            for _ in range(240):
                assert proc.poll() is None, (logs / f"{mount.name}-server.log").read_text()
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get(ready)).status_code == 200:
                        break
                await asyncio.sleep(0.25)
        yield
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
