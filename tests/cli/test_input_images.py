"""``imagen submit --image NAME=FILE``: the file lands in the owner's folder, the job names it."""

from __future__ import annotations

import asyncio
import io
import subprocess
import uuid
from pathlib import Path

import asyncpg
import pytest
from PIL import Image

from imagen_worker.config import load_config
from tests.fakes.comfyui import FakeComfyUI
from tests.fakes.storage import FakeStorage
from tests.workers import BIN, running_worker, terminal, worker_env, write_config

OWNER = uuid.UUID("00000000-0000-4000-8000-00000000c11a")
FAST = {"poll_interval": 0.5, "interrupt_grace": 2.0, "connect_timeout": 2.0, "timeout": 30}


def imagen(*args: str, dsn: str, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "imagen"), *args], env=worker_env(dsn, config), capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip


def photo(path: Path, size: tuple[int, int] = (48, 32), kind: str = "PNG") -> Path:
    out = io.BytesIO()
    Image.new("RGB", size, (30, 160, 90)).save(out, kind)
    path.write_bytes(out.getvalue())
    return path


def comfy_block(comfy: FakeComfyUI) -> dict[str, dict[str, object]]:
    return {"gpu": {"type": "comfyui", "urls": [comfy.url], "workflow": "sd15-img2img", **FAST}}


async def test_submit_image_with_local_storage_copies_it_under_its_key_and_the_worker_uses_it(
    db: asyncpg.Pool, database_url: str, tmp_path: Path, fake_comfyui: FakeComfyUI
) -> None:
    config = write_config(tmp_path, backends=comfy_block(fake_comfyui), owner_user_id=str(OWNER))
    cat = photo(tmp_path / "My Cat.png")

    submitted = await asyncio.to_thread(
        imagen, "submit", "a cat in oils", "--size", "512x512", "--image", f"init={cat}",
        dsn=database_url, config=config,
    )  # fmt: skip

    assert submitted.returncode == 0, submitted.stderr
    job_id = uuid.UUID(submitted.stdout.strip())
    params = await db.fetchval("SELECT params FROM imagen.jobs WHERE id = $1", job_id)
    key = params["images"]["init"]
    assert key.startswith(f"{OWNER}/uploads/my-cat-") and key.endswith(".png")
    assert f"{cat} uploaded as {key}" in submitted.stderr
    assert (tmp_path / "images" / key).read_bytes() == cat.read_bytes()
    async with running_worker(load_config(config), database_url):
        job = await terminal(db, job_id, within=15)
    assert job["status"] == "done", job["error"]
    assert fake_comfyui.files[("input", f"imagen/{job_id}", "init.png")] == cat.read_bytes()


async def test_submit_image_with_supabase_uploads_to_the_owners_folder(
    db: asyncpg.Pool, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    jpeg = photo(tmp_path / "beach.jpg", kind="JPEG")
    async with FakeStorage() as storage:
        monkeypatch.setenv("SUPABASE_URL", storage.url)
        monkeypatch.setenv("SUPABASE_SERVICE_KEY", storage.service_key)
        config = write_config(tmp_path, storage={"type": "supabase"}, owner_user_id=str(OWNER))

        submitted = await asyncio.to_thread(
            imagen, "submit", "a beach at noon", "-i", f"init={jpeg}", dsn=database_url, config=config
        )

        assert submitted.returncode == 0, submitted.stderr
        job_id = uuid.UUID(submitted.stdout.strip())
        params = await db.fetchval("SELECT params FROM imagen.jobs WHERE id = $1", job_id)
        key = params["images"]["init"]
        assert key.startswith(f"{OWNER}/uploads/beach-") and key.endswith(".jpg")
        stored = storage.get(key)
        assert stored is not None and stored.data == jpeg.read_bytes()
        assert stored.content_type == "image/jpeg"


@pytest.mark.parametrize(
    ("flag", "expected"),
    [
        ("init={tmp}/notes.txt", "--image init: {tmp}/notes.txt is not a PNG, JPEG or WebP image"),
        ("init={tmp}/moving.webp", "--image init: {tmp}/moving.webp is animated; input images must be still"),
        ("init={tmp}/absent.png", "--image init: cannot read {tmp}/absent.png: No such file or directory"),
        ("Init Photo={tmp}/cat.png", "--image 'Init Photo={tmp}/cat.png': expected NAME=FILE"),
        ("init", "--image 'init': expected NAME=FILE"),
    ],
)
async def test_a_bad_image_flag_is_refused_in_one_line_and_nothing_is_queued(
    db: asyncpg.Pool, database_url: str, tmp_path: Path, flag: str, expected: str
) -> None:
    (tmp_path / "notes.txt").write_text("not an image")
    photo(tmp_path / "cat.png")
    frames = [Image.new("RGB", (8, 8), colour) for colour in ("red", "blue")]
    frames[0].save(tmp_path / "moving.webp", save_all=True, append_images=frames[1:])
    config = write_config(tmp_path, owner_user_id=str(OWNER))
    before = await db.fetchval("SELECT count(*) FROM imagen.jobs")

    result = await asyncio.to_thread(
        imagen, "submit", "x", "--image", flag.format(tmp=tmp_path), dsn=database_url, config=config
    )

    assert result.returncode != 0
    assert expected.format(tmp=tmp_path) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert await db.fetchval("SELECT count(*) FROM imagen.jobs") == before


async def test_generate_image_runs_in_process_with_the_same_input_path(
    database_url: str, tmp_path: Path, fake_comfyui: FakeComfyUI
) -> None:
    config = write_config(tmp_path, backends=comfy_block(fake_comfyui), owner_user_id=str(OWNER))
    cat = photo(tmp_path / "cat.png")

    result = await asyncio.to_thread(
        imagen, "generate", "a cat in oils", "--size", "512x512", "-i", f"init={cat}",
        dsn=database_url, config=config,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).is_file()
    [(kind, folder, name)] = [key for key in fake_comfyui.files if key[0] == "input" and key[1]]
    assert (kind, name) == ("input", "init.png") and folder.startswith("imagen/")
    assert fake_comfyui.files[(kind, folder, name)] == cat.read_bytes()
