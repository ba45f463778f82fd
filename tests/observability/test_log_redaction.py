"""Logs: JSON lines off a TTY, readable on one, and no secret ever rendered."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
import structlog

from imagen_worker.config import Config
from imagen_worker.db.connect import describe_dsn
from imagen_worker.observability.logging import MASK, Redactor, config_secret_env_names, configure_logging
from tests.workers import insert_job, make_config, running_worker, terminal

SERVICE_KEY = "sb-service-key-5f0e1c2d9a8b7c6d"
SIGNED_TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJ1cmwiOiJpbWFnZXMvYS5wbmcifQ.c2lnbmF0dXJl"
BEARER = "abc123-bearer-value"


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers, root.level = handlers, level
    structlog.reset_defaults()


def _json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_secrets_never_reach_json_output(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUPABASE_SERVICE_KEY", SERVICE_KEY)
    out = io.StringIO()
    configure_logging("debug", stream=out)  # auto + not a TTY -> JSON
    log = structlog.get_logger("test").bind(job_id=str(uuid4()), backend="mock", attempt=1)

    log.info(
        "uploading",
        url=f"https://p.supabase.co/storage/v1/object/sign/images/a.png?token={SIGNED_TOKEN}&download=1",
        headers={"Authorization": f"Bearer {BEARER}", "apikey": SERVICE_KEY, "Content-Type": "image/png"},
        note=f"key was {SERVICE_KEY}",
        key_env="SUPABASE_SERVICE_KEY",
        dedupe_key="order-17",
    )
    logging.getLogger("httpx").warning("HTTP Request: GET %s", f"https://h/x?token={SIGNED_TOKEN}")
    try:
        raise RuntimeError(f"upload refused for Bearer {BEARER}")
    except RuntimeError:
        log.exception("upload failed")

    text = out.getvalue()
    for secret in (SERVICE_KEY, SIGNED_TOKEN, BEARER):
        assert secret not in text
    lines = _json_lines(text)
    assert len(lines) == 3
    first = lines[0]
    assert first["headers"] == {"Authorization": MASK, "apikey": MASK, "Content-Type": "image/png"}
    assert (
        first["url"] == f"https://p.supabase.co/storage/v1/object/sign/images/a.png?token={MASK}&download=1"
    )
    assert first["note"] == f"key was {MASK}"
    # Names of env vars and ordinary *_key fields are not secrets.
    assert first["key_env"] == "SUPABASE_SERVICE_KEY"
    assert first["dedupe_key"] == "order-17"
    assert {"job_id", "backend", "attempt", "level", "timestamp"} <= set(first)
    assert lines[1]["logger"] == "httpx" and f"token={MASK}" in str(lines[1]["event"])
    assert f"Bearer {MASK}" in str(lines[2]["exception"])


def test_suffix_rule_and_named_secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMFYUI_PROXY_TOKEN", "proxy-token-value-1")
    monkeypatch.setenv("COMFY_AUTH_HEADER", "header-value-xyz-2")
    monkeypatch.setenv("PLAIN_SETTING", "plain-value-visible")
    out = io.StringIO()
    configure_logging("info", "json", stream=out, secret_env=["COMFY_AUTH_HEADER"])
    structlog.get_logger().info(
        "connect", a="proxy-token-value-1", b="x header-value-xyz-2 y", c="plain-value-visible"
    )
    (line,) = _json_lines(out.getvalue())
    assert line["a"] == MASK
    assert line["b"] == f"x {MASK} y"
    assert line["c"] == "plain-value-visible"


def test_env_is_read_once_at_configure_time(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    monkeypatch.setenv("LATE_SECRET", "set-after-configure-1")
    structlog.get_logger().info("x", v="set-after-configure-1")
    assert _json_lines(out.getvalue())[0]["v"] == "set-after-configure-1"


def test_console_on_a_tty_and_levels() -> None:
    tty = _Tty()
    configure_logging("warning", "auto", stream=tty)
    log = structlog.get_logger("t")
    log.info("hidden below the level")
    log.warning("shown", password="hunter2-password")
    text = tty.getvalue()
    assert "hidden" not in text
    assert "shown" in text and "hunter2" not in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text.splitlines()[0])


def test_bad_level_or_format_is_refused() -> None:
    with pytest.raises(ValueError, match="log level"):
        configure_logging("loud")
    with pytest.raises(ValueError, match="log format"):
        configure_logging("info", "xml")  # type: ignore[arg-type]


def test_redactor_scrubs_urls_and_nested_values() -> None:
    redactor = Redactor(["short", "a-long-secret-value"])
    assert (
        redactor.scrub("postgresql://imagen:pw-123@db:5432/imagen")
        == f"postgresql://imagen:{MASK}@db:5432/imagen"
    )
    assert redactor.scrub("short") == MASK
    assert redactor.scrub("shortcut") == "shortcut"  # short values: exact match only
    nested = redactor.redact({"outer": [{"token": "t1"}, "a-long-secret-value!"], "n": 3})
    assert nested == {"outer": [{"token": MASK}, f"{MASK}!"], "n": 3}


def test_config_secret_env_names_collects_env_references() -> None:
    config = Config(
        backends={"comfy": {"type": "comfyui", "api_key_env": "COMFY_KEY", "headers": {"x-auth": "HDR"}}},
        storage={"type": "supabase", "key_env": "MY_SERVICE_KEY"},
    )
    assert config_secret_env_names(config) == {"COMFY_KEY", "HDR", "MY_SERVICE_KEY"}


async def test_lines_logged_inside_a_job_carry_its_id_backend_and_attempt(
    db: Any, database_url: str, tmp_path: Path
) -> None:
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    try:
        async with running_worker(make_config(tmp_path), database_url):
            job_id = await insert_job(db, "a tagged job", params={"mock_fail": "terminal"})
            await terminal(db, job_id)
    finally:
        configure_logging("info", "console")
    lines = [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]
    about_job = [line for line in lines if line.get("job_id") == str(job_id)]
    assert {line["event"] for line in about_job} >= {"job claimed", "job failed"}
    assert all(line["backend"] == "mock" and line["attempt"] == 1 for line in about_job)
    unrelated = [line for line in lines if line["event"] in ("worker started", "worker stopped")]
    assert unrelated and all("job_id" not in line for line in unrelated), "job fields stay in the job's task"
    started = next(line for line in lines if line["event"] == "worker started")
    assert started["database"] == describe_dsn(database_url), "which queue this worker serves, no password"
