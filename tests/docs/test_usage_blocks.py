"""docs/usage.md's ```sh runnable blocks run as written and exit 0.

The blocks run in document order, each in ``bash -euo pipefail`` with the installed programs
on PATH, in one scratch directory and against one fresh (unmigrated) database, with no
config file and no credentials: exactly what a newcomer following the page has. A block may
start a background worker; whatever a block leaves running is killed with its process group.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

USAGE = Path(__file__).resolve().parents[2] / "docs" / "usage.md"
BIN = Path(sys.executable).parent


def runnable_blocks() -> list[str]:
    return re.findall(r"^```sh runnable\n(.*?)^```", USAGE.read_text(), flags=re.S | re.M)


def test_usage_md_has_runnable_blocks() -> None:
    blocks = runnable_blocks()
    assert len(blocks) >= 4
    commands = "\n".join(blocks)
    for command in ("imagen-worker migrate", "imagen-worker run", "imagen submit", "imagen generate",
                    "imagen config show", "imagen cancel"):  # fmt: skip
        assert command in commands


def test_every_runnable_block_exits_0_in_order(tmp_path: Path, scratch_dsn: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMAGEN_", "SUPABASE_"))}
    env.pop("DATABASE_URL", None)
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        HOME=str(tmp_path / "home"),
        XDG_DATA_HOME=str(tmp_path / "data"),
        IMAGEN_DATABASE_URL=scratch_dsn,
    )
    for index, block in enumerate(runnable_blocks()):
        # `set -m`: job control, so `kill %1` and `wait %1` in a block work as in a terminal.
        proc = subprocess.Popen(
            ["bash", "-euo", "pipefail", "-c", f"set -m\n{block}"], cwd=tmp_path, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )  # fmt: skip
        try:
            out, err = proc.communicate(timeout=120)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        assert proc.returncode == 0, f"block {index}:\n{block}\nstdout:\n{out}\nstderr:\n{err}"
