"""``imagen config``: print a sample ``imagen.yaml``, check one, show the effective settings.

``validate`` reports every problem it can find in one run, each with its key path
(``worker.concurrency: ...``, ``backends.comfyui: ...``): the file and environment through
:func:`imagen_worker.config.collect_problems`, then every backend block through its adapter's
own ``from_config``, then cross-references between blocks. Warnings (storage ownership, a
password in ``database.url``) are printed but do not fail the check.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import typer
import yaml

from imagen_worker import backends, storage
from imagen_worker.cli.common import ConfigOption
from imagen_worker.cli.failures import guarded
from imagen_worker.config import (
    Config,
    collect_problems,
    config_file,
    describe_file,
    missing_file_problem,
    resolve_path,
    sources,
)
from imagen_worker.errors import ConfigError
from imagen_worker.observability.logging import Redactor
from imagen_worker.webhooks.outbox import read_secret

app = typer.Typer(
    add_completion=False,
    rich_markup_mode=None,  # plain help: flags without a "<bool>" type column
    no_args_is_help=True,
    help="Print a sample imagen.yaml, check one, show the settings.",
)

SAMPLE_RESOURCE = "sample-config.yaml"
# Keys whose values are secrets wherever they appear (an env-set backend header, a storage key).
_SECRET_LEAF = re.compile(r"(?i)^(api_?key|token|password|passwd|secret|service_key|key|authorization)$")


@dataclass
class Report:
    """The outcome of checking one configuration."""

    path: Path
    exists: bool
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def sample_text() -> str:
    """The commented sample configuration shipped with the package."""
    return resources.files("imagen_worker").joinpath(SAMPLE_RESOURCE).read_text(encoding="utf-8")


def _raw_file(path: Path) -> dict[str, Any]:
    """The file's top-level mapping, or {} when it is missing or unreadable (already reported)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _backend_blocks(config: Config | None, raw: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The blocks the worker would build; from the raw file when the config itself is invalid."""
    if config is not None:
        return dict(config.backend_blocks())
    blocks = raw.get("backends")
    if not isinstance(blocks, Mapping):
        return {}
    # Blocks without a usable ``type`` were already reported by the config validation.
    return {
        str(name): block
        for name, block in blocks.items()
        if isinstance(block, Mapping) and isinstance(block.get("type"), str)
    }


def _check_backends(blocks: Mapping[str, Mapping[str, Any]]) -> list[str]:
    problems = []
    for name, block in blocks.items():
        try:
            backends.create(name, block)
        except ConfigError as exc:
            problems.append(f"backends.{name}: {exc}")
        except ImportError as exc:
            problems.append(
                f"backends.{name}: the adapter for type {block.get('type')!r} cannot be loaded: {exc}"
            )
    return problems


def _check_references(config: Config) -> list[str]:
    names = config.backend_blocks()
    configured = f"(configured: {', '.join(names)})"
    problems = []
    if config.default_backend and config.default_backend not in names:
        problems.append(
            f"default_backend: {config.default_backend!r} is not a configured backend {configured}"
        )
    for index, name in enumerate(config.worker.backends or []):
        if name not in names:
            problems.append(f"worker.backends[{index}]: {name!r} is not a configured backend {configured}")
    return problems


def _check_environment(config: Config) -> list[str]:
    """What ``imagen-worker run`` refuses at start for an environment variable the config
    names: Storage's credentials when cloud sync is on (a sink is built, nothing is sent) and
    the webhooks' signing secret."""
    problems = []
    try:
        storage.create_sink(config)
    except ConfigError as exc:
        problems.append(str(exc))
    if config.webhooks is not None:
        try:
            read_secret(config.webhooks)
        except ConfigError as exc:
            problems.append(str(exc))
    return problems


def _check_storage(config: Config, report: Report) -> None:
    """Uploads nobody could see (no owner) are a warning; an unusable storage block an error."""
    try:
        warning = storage.owner_warning(config)
    except ConfigError as exc:
        report.errors.append(str(exc))
        return
    if warning:
        report.warnings.append(warning)


def _file_url_warnings(raw: Mapping[str, Any]) -> list[str]:
    database = raw.get("database")
    url = database.get("url") if isinstance(database, Mapping) else None
    if isinstance(url, str) and urlsplit(url).password:
        return [
            "database.url: the URL carries a password; put the whole URL in IMAGEN_DATABASE_URL "
            "instead of the config file"
        ]
    return []


def check(path: Path | None = None) -> Report:
    """Every problem with the effective configuration (file at ``path`` plus environment)."""
    file = resolve_path(path)
    report = Report(path=file, exists=file.is_file())
    if missing := missing_file_problem(path):
        report.errors.append(missing)
        return report
    config, problems = collect_problems(path)
    report.errors.extend(problems)
    raw = _raw_file(file) if report.exists else {}
    report.errors.extend(_check_backends(_backend_blocks(config, raw)))
    report.warnings.extend(_file_url_warnings(raw))
    if config is not None:
        report.errors.extend(_check_references(config))
        report.errors.extend(_check_environment(config))
        _check_storage(config, report)
    return report


@app.command()
def sample() -> None:
    """Print a commented sample imagen.yaml (valid as printed)."""
    typer.echo(sample_text(), nl=False)


@app.command()
def validate(
    path: Annotated[
        Path | None,
        typer.Argument(
            help="The file to check (default: --config, then $IMAGEN_CONFIG, then ~/.config/imagen.yaml)."
        ),
    ] = None,
    config_path: ConfigOption = None,
) -> None:
    """Check a configuration and print every problem with its key path."""
    report = check(path or config_path)
    for warning in report.warnings:
        typer.echo(f"warning: {warning}", err=True)
    if report.errors:
        for problem in report.errors:
            typer.echo(f"error: {problem}", err=True)
        count = len(report.errors)
        typer.echo(f"{report.path}: {count} problem{'s' if count != 1 else ''}", err=True)
        raise typer.Exit(1)
    _file, origin = config_file(path or config_path)
    if report.exists:
        typer.echo(f"ok: {report.path}" + (f" (from {origin})" if origin else ""))
    else:
        typer.echo(f"ok: {report.path} (no file: defaults and environment)")


def _shown(key: str, value: Any, redactor: Redactor) -> str:
    """A value as printed: secrets masked, env-var names marked set or not set."""
    leaf = key.rsplit(".", 1)[-1]
    if value is None:
        return "null"
    if isinstance(value, str) and (leaf.endswith("_env") or ".headers." in key):
        return f"{value} ({'set' if os.environ.get(value) else 'not set'})"
    if _SECRET_LEAF.match(leaf):
        return "***"
    return redactor.scrub(value if isinstance(value, str) else json.dumps(value))


@app.command()
def show(config_path: ConfigOption = None) -> None:
    """Print the effective settings, secrets masked, each with where it came from."""
    rows = guarded("imagen", lambda: sources(config_path))
    redactor = Redactor.from_env()
    typer.echo(f"# config file: {describe_file(config_path)}")
    width = max(len(key) for key, _, _ in rows)
    shown = [(key, _shown(key, value, redactor), source) for key, value, source in rows]
    value_width = min(max(len(value) for _, value, _ in shown), 48)
    for key, value, source in shown:
        typer.echo(f"{key:{width}}  {value:{value_width}}  {source}")
