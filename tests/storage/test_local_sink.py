"""LocalSink: a no-op in the output directory, an atomic idempotent copy elsewhere."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from imagen_worker.errors import ConfigError, TerminalError
from imagen_worker.storage import InvalidStorageKey
from imagen_worker.storage.local import LocalSink

KEY = "2026-05-11/fox-42-1a2b3c4d.png"


def _tree(directory: Path) -> list[Path]:
    return sorted(directory.rglob("*"))


@pytest.fixture
def rendered(output_dir: Path) -> Path:
    path = output_dir / "2026-05-11-fox-42.png"
    path.write_bytes(b"png bytes")
    return path


async def test_in_the_output_directory_put_is_a_no_op_returning_the_key(
    output_dir: Path, rendered: Path
) -> None:
    sink = LocalSink.from_config({"type": "local"}, output_directory=output_dir)
    before = _tree(output_dir)

    stored = await sink.put(KEY, rendered, "image/png")

    assert stored.key == KEY
    assert stored.location == (await anyio.Path(rendered).resolve()).as_uri()
    assert _tree(output_dir) == before
    assert sink.in_place and not sink.is_cloud


async def test_another_directory_gets_a_copy_under_the_key_and_a_file_uri(
    output_dir: Path, rendered: Path, tmp_path: Path
) -> None:
    sink = LocalSink.from_config(
        {"type": "local", "directory": str(tmp_path / "nas")}, output_directory=output_dir
    )

    stored = await sink.put(KEY, rendered, "image/png")
    url = await sink.sign(KEY, 60)

    target = anyio.Path(tmp_path / "nas" / KEY)
    assert await target.read_bytes() == b"png bytes"
    assert stored.location == url == (await target.resolve()).as_uri()
    assert url.startswith("file:///")


async def test_putting_the_same_key_twice_leaves_one_file_with_the_new_bytes(
    output_dir: Path, rendered: Path, tmp_path: Path
) -> None:
    sink = LocalSink(tmp_path / "nas", output_directory=output_dir)
    await sink.put(KEY, rendered, "image/png")
    await anyio.Path(rendered).write_bytes(b"re-rendered")

    await sink.put(KEY, rendered, "image/png")

    assert [p.name for p in (tmp_path / "nas").rglob("*") if p.is_file()] == [Path(KEY).name]
    assert (tmp_path / "nas" / KEY).read_bytes() == b"re-rendered"


@pytest.mark.parametrize("key", ["../escape.png", "2026-05-11/../../escape.png", "/etc/passwd", "a//b.png"])
async def test_keys_that_could_leave_the_directory_are_refused(
    output_dir: Path, rendered: Path, tmp_path: Path, key: str
) -> None:
    sink = LocalSink(tmp_path / "nas", output_directory=output_dir)

    with pytest.raises(InvalidStorageKey):
        await sink.put(key, rendered, "image/png")

    assert not (tmp_path / "nas").exists()
    assert not (tmp_path / "escape.png").exists()


async def test_signing_a_key_without_a_file_is_terminal(output_dir: Path, tmp_path: Path) -> None:
    sink = LocalSink(tmp_path / "nas", output_directory=output_dir)

    with pytest.raises(TerminalError, match="no local file"):
        await sink.sign(KEY, 60)


async def test_a_missing_source_file_is_terminal(output_dir: Path, tmp_path: Path) -> None:
    sink = LocalSink(tmp_path / "nas", output_directory=output_dir)

    with pytest.raises(TerminalError, match="missing"):
        await sink.put(KEY, output_dir / "gone.png", "image/png")


async def test_check_creates_the_directory(output_dir: Path, tmp_path: Path) -> None:
    sink = LocalSink(tmp_path / "nas" / "deep", output_directory=output_dir)

    await sink.check()

    assert (tmp_path / "nas" / "deep").is_dir()


def test_unknown_block_keys_are_refused(output_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['bucket'\]"):
        LocalSink.from_config({"type": "local", "bucket": "x"}, output_directory=output_dir)
