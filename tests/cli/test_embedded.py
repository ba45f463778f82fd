"""The embedded PostgreSQL: `imagen db status` / `imagen db stop`, and a demo that leaves no trace.

These start real embedded servers (pgserver) in the test's own data directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from imagen_worker.db.connect import embedded_dsn
from imagen_worker.errors import ConfigError
from tests.workers import BIN


def env_for(data_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMAGEN_", "SUPABASE_"))}
    env.pop("DATABASE_URL", None)
    env["XDG_DATA_HOME"] = str(data_home)
    return env


def imagen(*args: str, data_home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "imagen"), *args], env=env_for(data_home), capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip


def test_db_status_and_stop_follow_the_embedded_server(tmp_path: Path) -> None:
    pgdata = tmp_path / "imagen" / "pgdata"
    before = imagen("db", "status", data_home=tmp_path)
    assert before.stdout == f"not created: no data in {pgdata} (the first imagen command creates it)\n"

    listed = imagen("list", data_home=tmp_path)
    assert listed.returncode == 0, listed.stderr
    running = imagen("db", "status", data_home=tmp_path)
    try:
        assert running.stdout.startswith("running (pid ") and str(pgdata) in running.stdout
    finally:
        stopped = imagen("db", "stop", data_home=tmp_path)
    assert stopped.stdout == f"stopped the embedded server ({pgdata})\n"

    after = imagen("db", "status", data_home=tmp_path)
    assert after.stdout == f"stopped, data in {pgdata} (the next imagen command starts it)\n"
    assert imagen("db", "stop", data_home=tmp_path).stdout == "the embedded server was not running\n"


def test_an_embedded_server_that_cannot_start_is_one_sentence_with_its_reason_and_log(tmp_path: Path) -> None:
    pgdata = tmp_path / "imagen" / "pgdata"
    pgdata.mkdir(parents=True)
    (pgdata / "PG_VERSION").write_text("99\n")  # a damaged data directory: no configuration file

    for command in (["list"], ["submit", "a cat"]):
        failed = imagen(*command, data_home=tmp_path)

        assert failed.returncode == 69, failed.stderr
        assert failed.stdout == ""
        assert failed.stderr.count("\n") == 1, failed.stderr
        said = f"imagen: the embedded PostgreSQL in {pgdata} did not start: postgres: "
        assert failed.stderr.startswith(said), failed.stderr
        assert "postgresql.conf" in failed.stderr and f"its log is {pgdata / 'log'}" in failed.stderr
        assert "IMAGEN_DATABASE_URL" in failed.stderr


def test_without_the_embedded_extra_the_error_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pgserver", None)  # as if the extra were not installed
    with pytest.raises(ConfigError) as refused:
        embedded_dsn(tmp_path / "pgdata")
    assert "set IMAGEN_DATABASE_URL" in str(refused.value)
    assert "pip install 'dist/imagen_worker-<version>-py3-none-any.whl[embedded]'" in str(refused.value)
    assert not (tmp_path / "pgdata").exists()


def test_the_demo_never_touches_the_users_queue(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    user_data = tmp_path / "user-data"

    # Where the demo's throwaway directory goes (mkdtemp): short, because PostgreSQL's unix socket
    # lives in it and socket paths are limited to about 100 characters.
    scratch_root = Path(tempfile.mkdtemp(prefix="imgdemo-", dir="/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(scratch_root, ignore_errors=True))
    demo = subprocess.run(
        [sys.executable, "-m", "imagen_worker.demo"], env={**env_for(user_data), "TMPDIR": str(scratch_root)},
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip

    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "demo complete" in demo.stdout
    assert not user_data.exists(), "the demo wrote into the user's data directory"
    scratch = next(line for line in demo.stdout.splitlines() if line.startswith("demo complete"))
    images = Path(scratch.split("Images live in ", 1)[1].strip())
    assert images.is_relative_to(scratch_root)
    assert len(list(images.glob("*.png"))) == 2 and len(list(images.glob("*.png.json"))) == 2
    batch = sorted(p for p in images.glob("*.webp") if not p.name.endswith(".thumb.webp"))
    assert len(batch) == 4 and len(list(images.glob("*.thumb.webp"))) == 6, "a batch of four WebP, thumbnails"
    assert "imagen.images of job" in demo.stdout and demo.stdout.count(".thumb.webp") >= 8
    assert not (images.parent / "pgdata").exists(), "the demo's database is deleted at the end"
