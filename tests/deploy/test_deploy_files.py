"""Deployment files: the units verify, compose parses, and the env forms they use really load."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import yaml

from imagen_worker import backends
from imagen_worker.config import WorkerConfig, load_config
from imagen_worker.observability.metrics import HealthServer, Metrics, Readiness

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "imagen-worker.service"
USER_UNIT = DEPLOY / "imagen-worker.user.service"
PRUNE_UNIT = DEPLOY / "imagen-prune.service"
PRUNE_TIMER = DEPLOY / "imagen-prune.timer"
USER_PRUNE_UNIT = DEPLOY / "imagen-prune.user.service"
ENV_EXAMPLE = DEPLOY / "imagen-worker.env.example"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = ROOT / "compose.yaml"


def _directives(unit: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|min)?", value)
    assert match, value
    return int(match[1]) * (60 if match[2] == "min" else 1)


def test_system_unit_directives() -> None:
    d = _directives(UNIT)
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "WatchdogSec": "30",
        "ExecStart": "/usr/local/bin/imagen-worker run",
        "Restart": "on-failure",
        "RestartSec": "5",
        "KillSignal": "SIGTERM",
        "KillMode": "mixed",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "read-only",
        "ReadWritePaths": "/var/lib/imagen",
        "PrivateTmp": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectControlGroups": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
        "EnvironmentFile": "/etc/imagen-worker/imagen-worker.env",
        "User": "imagen",
        "StateDirectory": "imagen",
    }
    assert {key: d[key][-1] for key in expected} == expected
    # systemd must not SIGKILL a worker that is still inside its drain.
    assert _seconds(d["TimeoutStopSec"][-1]) > WorkerConfig().shutdown_grace


def _verify(
    unit: Path, tmp_path: Path, *args: str, env: dict[str, str] | None = None, with_units: Sequence[Path] = ()
) -> None:
    """``systemd-analyze verify`` with ExecStart pointed at an executable that exists here;
    ``with_units`` are verified beside it (a timer and its service). Each is copied under the
    name it is installed as (``x.user.service`` as ``x.service``)."""
    fake = tmp_path / "imagen-worker"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    copies = []
    for source in (unit, *with_units):
        copy = tmp_path / "units" / source.name.replace(".user.", ".")
        copy.parent.mkdir(exist_ok=True)
        copy.write_text(re.sub(r"^ExecStart=\S+", f"ExecStart={fake}", source.read_text(), flags=re.M))
        copies.append(str(copy))
    proc = subprocess.run(
        ["systemd-analyze", *args, "verify", *copies],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "" and proc.stderr.strip() == "", proc.stdout + proc.stderr


systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed"
)


@systemd_analyze
def test_system_unit_verifies(tmp_path: Path) -> None:
    _verify(UNIT, tmp_path)


@systemd_analyze
def test_prune_timer_and_its_service_verify(tmp_path: Path) -> None:
    _verify(PRUNE_TIMER, tmp_path, with_units=[PRUNE_UNIT])
    d = _directives(PRUNE_UNIT)
    assert d["Type"] == ["oneshot"]
    assert d["ExecStart"] == ["/opt/imagen-worker/bin/imagen prune --older-than 90d"]
    worker = _directives(UNIT)
    assert d["EnvironmentFile"] == worker["EnvironmentFile"] and d["User"] == worker["User"]
    assert _directives(PRUNE_TIMER)["OnCalendar"] == ["daily"]


@systemd_analyze
def test_user_unit_verifies(tmp_path: Path) -> None:
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    _verify(USER_UNIT, tmp_path, "--user", env={"XDG_RUNTIME_DIR": str(runtime)})
    d = _directives(USER_UNIT)
    assert d["Type"] == ["notify"] and d["WatchdogSec"] == ["30"]
    assert _seconds(d["TimeoutStopSec"][-1]) > WorkerConfig().shutdown_grace


@systemd_analyze
def test_user_prune_service_verifies_with_the_same_timer(tmp_path: Path) -> None:
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    env = {"XDG_RUNTIME_DIR": str(runtime)}
    _verify(PRUNE_TIMER, tmp_path, "--user", env=env, with_units=[USER_PRUNE_UNIT])
    d = _directives(USER_PRUNE_UNIT)
    assert d["Type"] == ["oneshot"]
    assert d["ExecStart"] == ["%h/.local/bin/imagen prune --older-than 90d"]
    assert d["EnvironmentFile"] == _directives(USER_UNIT)["EnvironmentFile"]
    assert "User" not in d


def _env_assignments(text: str) -> dict[str, str]:
    """``KEY=value`` lines, active or commented out (a commented example still documents the key)."""
    found = {}
    for line in text.splitlines():
        match = re.fullmatch(r"#?\s*([A-Z][A-Z0-9_]*)=(.*)", line.strip())
        if match:
            found[match[1]] = match[2]
    return found


def test_env_example_documents_every_variable() -> None:
    text = ENV_EXAMPLE.read_text()
    documented = _env_assignments(text)
    required = {
        "IMAGEN_DATABASE_URL",
        "DATABASE_URL",
        "IMAGEN_CONFIG",
        "IMAGEN_OUTPUT__DIRECTORY",
        "IMAGEN_OUTPUT__MIN_FREE_MB",
        "IMAGEN_CLOUD_SYNC",
        "IMAGEN_OWNER_USER_ID",
        "SUPABASE_URL",
        "SUPABASE_SERVICE_KEY",
        "MAI_SUPABASE_KEY",
        "IMAGEN_WORKER__CONCURRENCY",
        "IMAGEN_WORKER__POLL_INTERVAL",
        "IMAGEN_WORKER__LEASE_SECONDS",
        "IMAGEN_WORKER__MAX_ATTEMPTS",
        "IMAGEN_WORKER__SHUTDOWN_GRACE",
        "IMAGEN_METRICS__HOST",
        "IMAGEN_METRICS__PORT",
        "COMFYUI_URL",
    }
    assert required <= set(documented), required - set(documented)
    assert "NOTIFY_SOCKET" in text and "proxy" in text


def test_env_example_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    active = {
        key: value
        for key, value in _env_assignments(
            "\n".join(line for line in ENV_EXAMPLE.read_text().splitlines() if not line.startswith("#"))
        ).items()
        if key.startswith("IMAGEN_") and key not in ("IMAGEN_DATABASE_URL", "IMAGEN_OWNER_USER_ID")
    }
    for key, value in active.items():
        monkeypatch.setenv(key, value)
    config = load_config()
    block = {"type": "comfyui", "base_url": "http://127.0.0.1:8188", "workflow": "sdxl"}
    assert config.backends == {"comfyui": block}
    # The adapter itself accepts the block built from the environment.
    assert backends.create("comfyui", config.backends["comfyui"]).name == "comfyui"
    assert (config.worker.concurrency, config.worker.lease_seconds, config.worker.shutdown_grace) == (
        4,
        30,
        60,
    )
    assert (config.metrics.host, config.metrics.port) == ("127.0.0.1", 9464)


def _compose() -> dict[str, dict[str, dict[str, object]]]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


_VARIABLE = re.compile(r"\$\{([A-Z0-9_]+)(?::-([^${}]*))?\}")


def _interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's ``${VAR:-default}``, nested ones too, resolved from ``env`` (.env)."""
    env = env or {}
    while (match := _VARIABLE.search(value)) is not None:
        resolved = env.get(match[1]) or (match[2] or "")
        value = value[: match.start()] + resolved + value[match.end() :]
    return value


# What compose.yaml sets for the container itself, over .env; deploy.md and the example say so.
COMPOSE_OVERRIDES = {
    "IMAGEN_DATABASE_URL",
    "IMAGEN_CONFIG",
    "IMAGEN_BACKENDS__COMFYUI__TYPE",
    "IMAGEN_BACKENDS__COMFYUI__BASE_URL",
    "IMAGEN_BACKENDS__COMFYUI__WORKFLOW",
    "IMAGEN_OUTPUT__DIRECTORY",
    "IMAGEN_METRICS__HOST",
    "IMAGEN_METRICS__PORT",
}


def _active(text: str) -> dict[str, str]:
    return _env_assignments("\n".join(line for line in text.splitlines() if not line.startswith("#")))


def _container_env(service: str, dotenv: dict[str, str]) -> dict[str, str]:
    """What compose hands a container: every .env variable (env_file), then ``environment:``."""
    spec = _compose()["services"][service]
    assert spec["env_file"] == [{"path": ".env", "required": False}]
    environment = spec["environment"]
    assert isinstance(environment, dict)
    merged = dict(dotenv)
    merged.update({key: _interpolate(str(value), dotenv) for key, value in environment.items()})
    return merged


def test_compose_passes_every_dotenv_variable_and_overrides_only_the_documented_few() -> None:
    dotenv = {key: f"value-of-{key}" for key in _env_assignments(ENV_EXAMPLE.read_text())}
    for service in ("migrate", "worker"):
        container = _container_env(service, dotenv)
        changed = {key for key, value in dotenv.items() if container[key] != value}
        assert changed <= COMPOSE_OVERRIDES - {"IMAGEN_DATABASE_URL", "IMAGEN_CONFIG"}, changed
    text = (ROOT / "docs" / "deploy.md").read_text()
    for key in COMPOSE_OVERRIDES - {"IMAGEN_CONFIG", "IMAGEN_BACKENDS__COMFYUI__TYPE"}:
        assert key in text, f"deploy.md does not say that compose sets {key}"


def test_compose_with_the_example_as_dotenv_reaches_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    dotenv = _active(ENV_EXAMPLE.read_text())
    dotenv.update(
        IMAGEN_DATABASE_URL="postgresql://imagen@db.example.internal:5432/queue",
        IMAGEN_WORKER__POLL_INTERVAL="2",
        IMAGEN_WORKER__LEASE_SECONDS="45",
        IMAGEN_WORKER__MAX_ATTEMPTS="5",
        IMAGEN_BACKENDS__COMFYUI__WORKFLOW="flux-schnell",
        IMAGEN_BACKENDS__COMFYUI__TIMEOUT="900",
    )
    for key, value in _container_env("worker", dotenv).items():
        if value:
            monkeypatch.setenv(key, value)

    config = load_config()

    assert config.database_url() == "postgresql://imagen@db.example.internal:5432/queue"
    worker = config.worker
    assert (worker.poll_interval, worker.lease_seconds, worker.max_attempts) == (2, 45, 5)
    block = config.backends["comfyui"]
    assert block["base_url"] == "http://host.docker.internal:8188"
    assert (block["workflow"], block["timeout"]) == ("flux-schnell", 900)
    assert backends.create("comfyui", block).name == "comfyui"
    assert (config.metrics.host, config.metrics.port) == ("0.0.0.0", 9464)


def test_compose_without_a_dotenv_uses_the_bundled_postgres(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in _container_env("worker", {}).items():
        if value:
            monkeypatch.setenv(key, value)

    config = load_config()

    assert config.database_url() == "postgresql://imagen:imagen@postgres:5432/imagen"
    assert str(config.output.directory) == "/var/lib/imagen/images"


def test_env_example_sets_no_placeholder_that_would_be_used_for_real() -> None:
    active = _active(ENV_EXAMPLE.read_text())
    assert "IMAGEN_OWNER_USER_ID" not in active, "a nil-UUID owner would file every image under it"
    placeholders = {"SUPABASE_URL", "SUPABASE_SERVICE_KEY"} & set(active)
    assert not placeholders, "placeholder credentials would fail every job"
    assert not [key for key, value in active.items() if "CHANGE-ME" in value or "example" in value]


def test_compose_services_and_ordering() -> None:
    services = _compose()["services"]
    assert set(services) == {"postgres", "migrate", "worker"}
    assert services["postgres"]["image"] == "postgres:16"
    assert "pg_isready" in str(services["postgres"]["healthcheck"])
    assert services["migrate"]["command"] == ["migrate"]
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    worker = services["worker"]
    assert worker["depends_on"] == {"migrate": {"condition": "service_completed_successfully"}}
    assert worker["extra_hosts"] == ["host.docker.internal:host-gateway"]
    assert "/readyz" in str(worker["healthcheck"])
    assert "curl" not in str(worker["healthcheck"])


def _compose_cli() -> list[str] | None:
    """``docker compose`` (the plugin) or the standalone ``docker-compose``; no engine needed."""
    if shutil.which("docker") is not None:
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return ["docker", "compose"]
    standalone = shutil.which("docker-compose")
    return [standalone] if standalone else None


COMPOSE_CLI = _compose_cli()


@pytest.mark.skipif(COMPOSE_CLI is None, reason="no Compose implementation (docker compose / docker-compose)")
def test_docker_compose_config_with_a_dotenv_shows_its_variables(tmp_path: Path) -> None:
    """The real Compose agrees with the parsing above (skipped where none is installed)."""
    assert COMPOSE_CLI is not None
    shutil.copy(COMPOSE, tmp_path / "compose.yaml")
    dotenv = _active(ENV_EXAMPLE.read_text())
    dotenv.update(IMAGEN_WORKER__POLL_INTERVAL="2", IMAGEN_DATABASE_URL="postgresql://imagen@db.internal/q")
    (tmp_path / ".env").write_text("".join(f"{k}={v}\n" for k, v in dotenv.items()))
    proc = subprocess.run(
        [*COMPOSE_CLI, "-f", "compose.yaml", "config", "--format", "json"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    env = json.loads(proc.stdout)["services"]["worker"]["environment"]
    assert env == _container_env("worker", dotenv)


def test_dockerfile_shape() -> None:
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM (\S+)(?: AS (\w+))?", text, flags=re.M)
    assert len(stages) == 2 and stages[0][1] == "build"
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in text
    final = text[text.rindex("\nFROM ") :]
    assert "build-essential" not in final and "apt-get" not in final
    assert re.search(r"^USER imagen$", final, flags=re.M)
    assert 'ENTRYPOINT ["imagen-worker"]' in final and 'CMD ["run"]' in final
    assert "HEALTHCHECK" in final


def _healthcheck_command(text: str) -> list[str]:
    match = re.search(r"HEALTHCHECK [^\n]*\\\n\s+CMD (\[.*\])", text)
    assert match
    command = json.loads(match[1])
    assert isinstance(command, list)
    return [str(part) for part in command]


async def test_dockerfile_healthcheck_command_follows_readyz() -> None:
    command = _healthcheck_command(DOCKERFILE.read_text())
    assert command[0] == "python" and "/readyz" in command[-1]
    assert not any("curl" in part for part in command)
    state = Readiness(database=True, listener=True, backends={"comfyui": True})

    async def readiness() -> Readiness:
        return state

    async with HealthServer("127.0.0.1", 0, readiness, metrics=Metrics()) as server:

        async def run() -> int:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                *command[1:],
                env={**os.environ, "IMAGEN_METRICS__PORT": str(server.port)},
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            return await proc.wait()

        assert await run() == 0
        state = Readiness(database=False, listener=True, backends={"comfyui": True})
        assert await run() != 0
