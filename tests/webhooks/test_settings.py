"""The ``webhooks:`` block: typed, optional, and its secret only ever named, never written."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagen_worker.config import WebhookEvent, collect_problems, load_config
from imagen_worker.observability.logging import MASK, Redactor, config_secret_env_names
from imagen_worker.observability.metrics import Metrics
from tests.workers import write_config

URL = "https://hooks.example.com/imagen"


def test_webhooks_are_off_unless_configured(tmp_path: Path) -> None:
    assert load_config(write_config(tmp_path)).webhooks is None


def test_a_block_with_only_a_url_gets_production_defaults(tmp_path: Path) -> None:
    hooks = load_config(write_config(tmp_path, webhooks={"url": URL})).webhooks
    assert hooks is not None and str(hooks.url) == URL
    assert hooks.secret_env == "IMAGEN_WEBHOOK_SECRET"
    assert hooks.events == [WebhookEvent.DONE, WebhookEvent.FAILED, WebhookEvent.CANCELLED]
    assert (hooks.timeout, hooks.max_attempts, hooks.concurrency) == (10.0, 8, 4)


def test_the_environment_can_set_the_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEN_WEBHOOKS__URL", URL)
    monkeypatch.setenv("IMAGEN_WEBHOOKS__EVENTS", '["failed"]')
    hooks = load_config(write_config(tmp_path)).webhooks
    assert hooks is not None and str(hooks.url) == URL and hooks.events == [WebhookEvent.FAILED]


@pytest.mark.parametrize(
    ("block", "problem"),
    [
        ({"url": URL, "secret": "s3cr3t-inline-value"}, "webhooks.secret: secrets must not be written"),
        ({"url": "ftp://example.com/x"}, "webhooks.url"),
        ({"url": URL, "events": ["started"]}, "webhooks.events.0"),
        ({"url": URL, "events": []}, "webhooks.events"),
        ({"url": URL, "timeout": 0}, "webhooks.timeout"),
        ({"url": URL, "max_attempts": 0}, "webhooks.max_attempts"),
        ({"url": URL, "secret_env": "not a name"}, "webhooks.secret_env"),
        ({"url": URL, "retries": 3}, "webhooks.retries"),
    ],
)
def test_bad_blocks_are_refused_with_the_key_named(
    tmp_path: Path, block: dict[str, object], problem: str
) -> None:
    config, problems = collect_problems(write_config(tmp_path, webhooks=block))
    assert config is None
    assert any(p.startswith(problem) for p in problems), problems


def test_the_secret_variable_is_masked_in_logs_whatever_its_name(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, webhooks={"url": URL, "secret_env": "HOOK_SIGNING"}))
    names = config_secret_env_names(config)
    assert "HOOK_SIGNING" in names
    redactor = Redactor.from_env({"HOOK_SIGNING": "a-long-signing-value-1234"}, names)
    assert redactor.scrub("sent with a-long-signing-value-1234") == f"sent with {MASK}"


def test_delivery_outcomes_are_exported_from_zero() -> None:
    metrics = Metrics()
    metrics.prime(["mock"])
    text = metrics.exposition()[0].decode()
    for outcome in ("delivered", "retried", "failed"):
        assert f'imagen_webhook_deliveries_total{{outcome="{outcome}"}} 0.0' in text


async def test_imagen_worker_check_names_a_missing_secret_and_passes_with_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from imagen_worker.check import run_checks

    config = load_config(write_config(tmp_path, webhooks={"url": URL}))
    [line] = [r for r in await run_checks(config, dsn=None) if r.name == "webhooks"]
    assert not line.ok
    assert line.detail.startswith(
        "webhooks.secret_env: environment variable IMAGEN_WEBHOOK_SECRET is not set"
    )

    monkeypatch.setenv("IMAGEN_WEBHOOK_SECRET", "0123456789abcdef0123")
    [line] = [r for r in await run_checks(config, dsn=None) if r.name == "webhooks"]
    assert line.ok
    assert line.detail == "signed POSTs to hooks.example.com when jobs end (done, failed, cancelled)"
    assert "0123456789abcdef0123" not in line.detail
