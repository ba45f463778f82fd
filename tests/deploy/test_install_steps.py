"""docs/deploy.md's systemd steps, run as written, in a sandbox root.

Every command of sections 0 and 1 (the housekeeping timer's included) is taken from the
document itself. ``sudo`` is dropped, absolute paths (/opt, /usr/local/bin, /etc, /var/lib)
are moved under a temporary root, and ownership flags for the ``imagen`` user (which this test
does not create) are left out; otherwise the commands run unchanged: the wheel is built with
``make dist``, installed into a fresh virtualenv, ``check`` passes against the real database
and a protocol-faithful ComfyUI before anything was started, ``migrate`` applies the schema,
``systemd-analyze verify`` accepts the unit as installed, its ExecStart pointing at the
installed program, and the prune's dry run answers as the service's user would run it.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.fakes.comfyui import FakeComfyUI

ROOT = Path(__file__).resolve().parents[2]
DEPLOY_MD = ROOT / "docs" / "deploy.md"
MOVED = ("/opt/", "/usr/local/bin/", "/etc/", "/var/lib/imagen")


def section(number: str) -> str:
    text = DEPLOY_MD.read_text()
    start = text.index(f"\n## {number}. ")
    end = text.find("\n## ", start + 1)
    return text[start:end]


def commands(text: str) -> list[str]:
    """The commands of every ```sh block, continuation lines joined, comments dropped."""
    found = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            command = line.split("  #", 1)[0].strip()
            if command and not command.startswith("#"):
                found.append(command)
    return found


def test_the_steps_come_in_a_working_order() -> None:
    steps = commands(section("1"))
    index = {name: next(i for i, c in enumerate(steps) if pattern in c) for name, pattern in {
        "venv": "-m venv /opt/imagen-worker",
        "install": "pip install dist/imagen_worker-",
        "state": "install -d -m 0750 -o imagen -g imagen /var/lib/imagen",
        "env": "/etc/imagen-worker/imagen-worker.env",
        "check": "imagen-worker check",
        "migrate": "imagen-worker migrate",
        "unit": "install -m 0644 deploy/imagen-worker.service",
        "verify": "systemd-analyze verify",
        "start": "systemctl enable --now imagen-worker",
    }.items()}  # fmt: skip
    order = ["venv", "install", "state", "env", "check", "migrate", "unit", "verify", "start"]
    assert sorted(order, key=index.__getitem__) == order
    assert "make dist" in commands(section("0"))
    assert "pip install imagen-worker" not in DEPLOY_MD.read_text(), "not on PyPI"


def sandboxed(command: str, root: Path) -> list[str] | None:
    """The command as this test may run it, or None for those that change the host's users/units."""
    words = shlex.split(command)
    if words[0] == "sudo":
        words = words[1:]
    if words[0] in ("useradd", "sudoedit", "systemctl", "journalctl", "git", "cd"):
        return None
    if words[0] == "install":
        drop = {i for i, w in enumerate(words) if words[i - 1] in ("-o", "-g") or w in ("-o", "-g")}
        words = [w for i, w in enumerate(words) if i not in drop]
    return [move(word, root) for word in words]


def move(word: str, root: Path) -> str:
    for prefix in MOVED:
        if word.startswith(prefix):
            return f"{root}{word}"
    return word


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
async def test_the_documented_install_works_and_the_installed_unit_verifies(
    tmp_path: Path, scratch_dsn: str
) -> None:
    root = tmp_path / "root"
    for directory in ("opt", "usr/local/bin", "etc/systemd/system", "var/lib"):
        (root / directory).mkdir(parents=True)
    work = tmp_path / "checkout"
    work.mkdir()
    (work / "deploy").symlink_to(ROOT / "deploy")
    dist = work / "dist"
    built = subprocess.run(
        ["make", "-s", "-C", str(ROOT), "dist", f"DIST={dist}"], capture_output=True, text=True, timeout=300
    )
    assert built.returncode == 0, built.stderr

    env_file = root / "etc/imagen-worker/imagen-worker.env"
    ran: list[str] = []
    async with FakeComfyUI() as comfyui:
        for command in commands(section("1")):
            argv = sandboxed(command, root)
            if argv is None:
                continue
            if argv[0] == "systemd-run":
                program = next(i for i, word in enumerate(argv) if word in ("imagen-worker", "imagen"))
                argv = [str(root / "usr/local/bin" / argv[program]), *argv[program + 1 :]]
                env = {**os.environ, **service_env(env_file, root, scratch_dsn, comfyui.url)}
            else:
                env = dict(os.environ)
                if argv[0] == "imagen-worker":
                    argv[0] = str(root / "usr/local/bin/imagen-worker")
            if argv[0] == "systemd-analyze":
                point_exec_start_into(root)
            # In a thread: the fake ComfyUI answers from this event loop.
            done = await asyncio.to_thread(
                subprocess.run, argv, cwd=work, env=env, capture_output=True, text=True, timeout=300
            )
            assert done.returncode == 0, (command, done.stdout, done.stderr)
            ran.append(f"{Path(argv[0]).name} {argv[1]}")
            if argv[-1] == "check":
                assert "FAIL" not in done.stdout and "output directory" in done.stdout
            if argv[-1] == "--version":
                assert done.stdout == "imagen-worker 0.1.0\n"
            if argv[-1] == "--dry-run":
                assert done.stdout.startswith("would remove 0 jobs and 0 webhook deliveries"), done.stdout

    expected = ("imagen-worker check", "imagen-worker migrate", "systemd-analyze verify", "imagen prune")
    assert set(expected) <= set(ran), ran
    for unit in ("imagen-prune.service", "imagen-prune.timer"):
        assert (root / "etc/systemd/system" / unit).read_text() == (ROOT / "deploy" / unit).read_text()
    installed = root / "opt/imagen-worker/bin/imagen-worker"
    assert (root / "usr/local/bin/imagen-worker").resolve() == installed.resolve()
    assert (root / "var/lib/imagen").stat().st_mode & 0o777 == 0o750


def service_env(env_file: Path, root: Path, dsn: str, comfyui_url: str) -> dict[str, str]:
    """The EnvironmentFile as the operator edited it: the database and ComfyUI filled in."""
    env = {}
    for line in env_file.read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = move(value, root)
    env.update(IMAGEN_DATABASE_URL=dsn, IMAGEN_BACKENDS__COMFYUI__BASE_URL=comfyui_url, HOME=str(root))
    return env


def point_exec_start_into(root: Path) -> None:
    """The unit as installed names /usr/local/bin/imagen-worker; here that is under the root."""
    unit = root / "etc/systemd/system/imagen-worker.service"
    text = unit.read_text()
    assert "\nExecStart=/usr/local/bin/imagen-worker run\n" in text
    unit.write_text(text.replace("ExecStart=/usr/local/bin/", f"ExecStart={root}/usr/local/bin/"))
