"""Configuration: ``imagen.yaml`` plus ``IMAGEN_*`` environment overrides.

Precedence, highest first: explicit overrides (CLI flags) > environment > file > defaults.
The file is ``--config PATH``, else ``$IMAGEN_CONFIG``, else ``~/.config/imagen.yaml``. A
file named by ``--config`` or ``$IMAGEN_CONFIG`` must exist (a typo must never start a worker
on the built-in defaults); only a missing default file means defaults. Secrets never live in
the file: a block names the environment variable that holds them
(``key_env: SUPABASE_SERVICE_KEY``) and inline secret-looking keys are refused, so a config
file can be committed or shown without leaking anything.
"""

from __future__ import annotations

import enum
import os
import re
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from imagen_worker.errors import ConfigError

DEFAULT_PATH = Path("~/.config/imagen.yaml")
CloudSync = Literal["auto", "on", "off"]

SWITCH_WORDS = {"true": "on", "yes": "on", "false": "off", "no": "off"}

_SECRET_KEY = re.compile(
    r"^(api[_-]?key|apikey|token|access[_-]?token|auth[_-]?token|password|passwd|secret|"
    r"client[_-]?secret|service[_-]?key|private[_-]?key|key)$",
    re.IGNORECASE,
)


def data_dir() -> Path:
    """Per-user data directory (embedded database, default images)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "imagen"


class _Block(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OutputConfig(_Block):
    directory: Path = Field(default_factory=lambda: data_dir() / "images")
    naming: str = "{date}-{slug}-{seed}.{ext}"
    write_metadata_json: bool = True
    cloud_sync: CloudSync = "auto"
    # Live previews are deleted from Storage when their job ends, unless kept.
    keep_previews: bool = False
    # What a job gets unless its own jobs.format / jobs.quality say otherwise.
    format: Literal["png", "webp", "jpeg"] = "png"
    quality: int = Field(default=90, ge=1, le=100)
    # Prompt, seed and workflow inside the image file (PNG text, EXIF); false strips them all.
    embed_metadata: bool = True
    # With embed_metadata: the backend's workflow graph too (ours, and ComfyUI's own PNG
    # chunks). Whoever downloads the image can read it; false keeps prompt, seed and params.
    embed_workflow: bool = True
    # Longer side of the WebP thumbnail uploaded beside each image; 0 makes none.
    thumbnail_size: int = Field(default=256, ge=0, le=2048)
    # The worker claims nothing while the directory's filesystem has less free; 0: no floor.
    min_free_mb: int = Field(default=100, ge=0)

    @field_validator("cloud_sync", mode="before")
    @classmethod
    def _switch(cls, value: Any) -> Any:
        """YAML reads a plain ``off``/``on``/``yes``/``no`` as a boolean: take it as meant."""
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, str) and value.strip().lower() in SWITCH_WORDS:
            return SWITCH_WORDS[value.strip().lower()]
        return value

    @field_validator("directory")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @field_validator("naming")
    @classmethod
    def _known_placeholders(cls, value: str) -> str:
        from imagen_worker.output import check_naming

        check_naming(value)
        return value


class WorkerConfig(_Block):
    concurrency: int = Field(default=4, ge=1, le=256)
    poll_interval: float = Field(default=5.0, gt=0, le=3600)
    lease_seconds: float = Field(default=30.0, ge=3, le=3600)
    max_attempts: int = Field(default=3, ge=1, le=50)
    # Running jobs one owner may have across the whole fleet (None: no limit).
    max_running_per_owner: int | None = Field(default=None, ge=1)
    shutdown_grace: float = Field(default=60.0, ge=0, le=86400)
    backends: list[str] | None = None
    retry_base_seconds: float = Field(default=2.0, gt=0)
    retry_max_seconds: float = Field(default=300.0, gt=0)
    # A backend no live worker has served for this long is abandoned: its jobs that waited as
    # long fail ("no worker serves it"). Shorter gaps (restarts, deploys) only make them wait.
    orphan_after: float = Field(default=600.0, ge=0, le=86400)
    # How often one job may go back to pending because its backend was down, without
    # spending an attempt; past it an outage counts as an ordinary retryable failure.
    max_outage_requeues: int = Field(default=5, ge=0, le=1000)


class DatabaseConfig(_Block):
    """The connection and the limits that keep a stalled server from hanging the worker.

    Timeouts are seconds; 0 turns one off. ``command_timeout`` bounds each statement on the
    client side (the pool); the others are session settings the server enforces.
    """

    url: str | None = None
    command_timeout: float = Field(default=30.0, ge=0, le=86400)
    statement_timeout: float = Field(default=30.0, ge=0, le=86400)
    lock_timeout: float = Field(default=5.0, ge=0, le=86400)
    idle_in_transaction_session_timeout: float = Field(default=60.0, ge=0, le=86400)

    def session_settings(self) -> dict[str, str]:
        """The server-side limits as ``server_settings`` (milliseconds; omitted when 0)."""
        limits = {
            "statement_timeout": self.statement_timeout,
            "lock_timeout": self.lock_timeout,
            "idle_in_transaction_session_timeout": self.idle_in_transaction_session_timeout,
        }
        return {name: str(round(seconds * 1000)) for name, seconds in limits.items() if seconds > 0}


class MetricsConfig(_Block):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=9464, ge=0, le=65535)


class WebhookEvent(enum.StrEnum):
    """The job endings a webhook can announce: the final statuses of a job."""

    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class WebhooksConfig(_Block):
    """Completion webhooks: a signed POST per finished job, from a database outbox.

    The signing secret lives only in the environment variable ``secret_env`` names. Attempts
    wait ``backoff_base`` * 2^n seconds (with jitter, at most ``backoff_max``) in between.
    """

    url: AnyHttpUrl
    secret_env: str = Field(default="IMAGEN_WEBHOOK_SECRET", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    events: list[WebhookEvent] = Field(default_factory=lambda: list(WebhookEvent), min_length=1)
    timeout: float = Field(default=10.0, gt=0, le=300)
    max_attempts: int = Field(default=8, ge=1, le=50)
    backoff_base: float = Field(default=1.0, gt=0, le=3600)
    backoff_max: float = Field(default=300.0, gt=0, le=86400)
    concurrency: int = Field(default=4, ge=1, le=64)
    poll_interval: float = Field(default=5.0, gt=0, le=3600)

    @field_validator("events")
    @classmethod
    def _unique(cls, value: list[WebhookEvent]) -> list[WebhookEvent]:
        return list(dict.fromkeys(value))


_file_data: ContextVar[dict[str, Any]] = ContextVar("imagen_config_file_data")


class _FileSource(InitSettingsSource):
    """The YAML file's contents, ranked below the environment."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls, init_kwargs=_file_data.get({}))


_INT = re.compile(r"-?\d+")
_FLOAT = re.compile(r"-?\d+\.\d*|-?\.\d+")
_BOOL = {"true": True, "false": False}


def _scalar(value: Any) -> Any:
    """An environment string as the YAML scalar it spells (``"600"`` -> 600, ``"true"`` -> True)."""
    if isinstance(value, dict):
        return {key: _scalar(item) for key, item in value.items()}
    if not isinstance(value, str):
        return value
    if _INT.fullmatch(value):
        return int(value)
    if _FLOAT.fullmatch(value):
        return float(value)
    return _BOOL.get(value.lower(), value)


class _TypedEnvSource(EnvSettingsSource):
    """Environment overrides, with adapter blocks typed like YAML.

    The framework does not know the keys of a backend or storage block, so pydantic cannot
    coerce ``IMAGEN_BACKENDS__GPU__TIMEOUT=900`` for the adapter; decoding plain scalars here
    lets the adapter validate a number as it would from the file.
    """

    def __call__(self) -> dict[str, Any]:
        data = super().__call__()
        for block in ("backends", "storage"):
            if isinstance(data.get(block), dict):
                data[block] = _scalar(data[block])
        return data


class Config(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="IMAGEN_",
        env_nested_delimiter="__",
        extra="forbid",
        nested_model_default_partial_update=True,
    )

    default_backend: str | None = None
    owner_user_id: str | None = None
    output: OutputConfig = Field(default_factory=OutputConfig)
    backends: dict[str, dict[str, Any]] = Field(default_factory=dict)
    storage: dict[str, Any] = Field(default_factory=lambda: {"type": "supabase"})
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    webhooks: WebhooksConfig | None = None

    source_path: Path | None = Field(default=None, exclude=True)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, _TypedEnvSource(settings_cls), _FileSource(settings_cls))

    @field_validator("owner_user_id")
    @classmethod
    def _uuid(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        from uuid import UUID

        try:
            return str(UUID(value))
        except ValueError:
            raise ValueError(f"not a UUID: {value!r}") from None

    @field_validator("storage")
    @classmethod
    def _storage_type(cls, value: dict[str, Any]) -> dict[str, Any]:
        """A block given only by env (``IMAGEN_STORAGE__BUCKET``) keeps the default type."""
        return {"type": "supabase", **value}

    @field_validator("backends")
    @classmethod
    def _typed_blocks(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name, block in value.items():
            if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
                raise ValueError(f"backend name {name!r}: use letters, digits, '_', '-', '.'")
            if not isinstance(block, dict) or not isinstance(block.get("type"), str):
                raise ValueError(f'backend "{name}": missing "type"')
        return value

    # --- derived values -------------------------------------------------------------

    def backend_blocks(self) -> dict[str, dict[str, Any]]:
        """Configured backends, or a mock backend so a fresh install works out of the box."""
        return self.backends or {"mock": {"type": "mock"}}

    def default_backend_name(self) -> str:
        blocks = self.backend_blocks()
        if self.default_backend:
            return self.default_backend
        return next(iter(blocks))

    def served_backends(self) -> list[str]:
        return self.worker.backends or list(self.backend_blocks())

    def database_url(self) -> str | None:
        """``IMAGEN_DATABASE_URL`` > ``database.url`` > ``DATABASE_URL``; None means embedded."""
        url = self.database.url or os.environ.get("DATABASE_URL") or None
        if url is not None and urlsplit(url).scheme not in ("postgresql", "postgres"):
            where = "database.url (IMAGEN_DATABASE_URL)" if self.database.url else "DATABASE_URL"
            # Not echoed: a URL may hold a password.
            raise ConfigError(
                f"{where} is not a PostgreSQL URL: write it as postgresql://USER@HOST:5432/DBNAME"
            )
        return url


def resolve_path(path: str | Path | None) -> Path:
    return config_file(path)[0]


def config_file(path: str | Path | None) -> tuple[Path, str | None]:
    """The file to read and who named it (``--config``, ``$IMAGEN_CONFIG``, or None: the default)."""
    if path:
        return Path(path).expanduser(), "--config"
    env = os.environ.get("IMAGEN_CONFIG")
    if env:
        return Path(env).expanduser(), "$IMAGEN_CONFIG"
    return DEFAULT_PATH.expanduser(), None


def describe_file(path: str | Path | None) -> str:
    """Which file a command reads, in words, for its first line of output."""
    file, origin = config_file(path)
    if origin is not None:
        return f"{file} (from {origin})"
    return str(file) if file.exists() else f"no file at {file}: defaults and environment"


def missing_file_problem(path: str | Path | None) -> str | None:
    """A file named explicitly that does not exist is an error, never a silent fallback."""
    file, origin = config_file(path)
    if origin is None or file.is_file():
        return None
    what = "does not exist" if not file.exists() else "is not a file"
    return f"config file {file} (from {origin}) {what}"


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    return data


def inline_secrets(data: Any, path: str = "") -> Iterator[str]:
    """Key paths in ``data`` that hold a secret-looking literal instead of an env-var name."""
    if isinstance(data, Mapping):
        for key, value in data.items():
            here = f"{path}.{key}" if path else str(key)
            if isinstance(value, str) and value and _SECRET_KEY.match(str(key)):
                yield here
            else:
                yield from inline_secrets(value, here)
    elif isinstance(data, list):
        for index, item in enumerate(data):
            yield from inline_secrets(item, f"{path}[{index}]")


def _secret_problems(data: dict[str, Any]) -> list[str]:
    return [
        f"{key}: secrets must not be written in the config file; "
        f"use {key.rsplit('.', 1)[-1]}_env: NAME_OF_ENV_VAR and export the secret there"
        for key in inline_secrets(data)
    ]


def _format_validation(exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors():
        loc = ".".join(str(part) for part in err["loc"]) or "(top level)"
        # Validators that already name their key ("output.naming: ...") are not prefixed twice.
        msg = err["msg"].removeprefix("Value error, ").removeprefix(f"{loc}: ")
        # Say where a bad value came from when it was the environment, not the file.
        env_name = "IMAGEN_" + "__".join(str(part).upper() for part in err["loc"])
        origin = f" (from ${env_name})" if err["loc"] and env_name in os.environ else ""
        problems.append(f"{loc}: {msg}{origin}")
    return problems


# IMAGEN_ variables read outside the settings model.
_OTHER_ENV = frozenset({"IMAGEN_CONFIG", "IMAGEN_DATABASE_URL", "IMAGEN_DEBUG", "IMAGEN_CLOUD_SYNC"})


def _near(a: str, b: str) -> bool:
    """At most two single-letter edits apart (a swap of two letters is two)."""
    if abs(len(a) - len(b)) > 2:
        return False
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1] <= 2


def _misspelled_env() -> list[str]:
    """``IMAGEN_`` variables a typo away from a setting. Other unknown names are left alone
    (a deployment may keep its own), but a near miss would leave the setting at its default
    without a word: ``IMAGEN_DATABASE_ULR`` would mean the embedded database."""
    known = sorted(
        {f"IMAGEN_{name.upper()}" for name in Config.model_fields if name != "source_path"} | _OTHER_ENV
    )
    problems = []
    for name in sorted(os.environ):
        head, nested, rest = name.upper().partition("__")  # without "__", head is the whole name
        if not head.startswith("IMAGEN_") or head in known:
            continue
        if match := next((k for k in known if _near(head, k)), None):
            meant = f"{match}{nested}{rest}"
            problems.append(f"${name} is not a setting: did you mean ${meant}?")
    return problems


def collect_problems(path: str | Path | None = None, **overrides: Any) -> tuple[Config | None, list[str]]:
    """Load the config and return every problem found, instead of stopping at the first."""
    file = resolve_path(path)
    if missing := missing_file_problem(path):
        return None, [missing]
    try:
        data = _read_yaml(file)
    except ConfigError as exc:
        return None, [str(exc)]
    problems = _secret_problems(data) + _misspelled_env()
    token = _file_data.set(data)
    try:
        config = Config(**overrides)
    except ValidationError as exc:
        return None, problems + _format_validation(exc)
    finally:
        _file_data.reset(token)
    config.source_path = file if file.exists() else None
    if (url := os.environ.get("IMAGEN_DATABASE_URL")) and not overrides.get("database"):
        config.database.url = url
    return (None if problems else config), problems


def load_config(path: str | Path | None = None, **overrides: Any) -> Config:
    config, problems = collect_problems(path, **overrides)
    if problems or config is None:
        raise ConfigError(one_line(path, problems))
    return config


def one_line(path: str | Path | None, problems: list[str]) -> str:
    """Every problem on one line: a failing command prints one line, journald keeps one record."""
    if len(problems) == 1 and problems[0].startswith("config file "):
        return problems[0]
    return f"invalid configuration ({describe_file(path)}): " + "; ".join(problems)


def sources(path: str | Path | None = None) -> list[tuple[str, Any, str]]:
    """Every effective setting as ``(key path, value, source)``; source is file, env NAME or default.

    Values are as loaded, not yet redacted: ``imagen config show`` masks them before printing.
    """
    config = load_config(path)
    file, _origin = config_file(path)
    file_data = _read_yaml(file)
    env_data = _TypedEnvSource(Config)()
    values = config.model_dump(mode="json", exclude={"source_path"})
    values["backends"] = config.backend_blocks()
    values["default_backend"] = config.default_backend_name()
    rows: list[tuple[str, Any, str]] = []
    for parts, value in _leaves(values):
        if parts[0] == "backends" and not config.backends:
            rows.append((".".join(parts), value, "default (no backend configured)"))
        else:
            rows.append((".".join(parts), value, _source_of(parts, env_data, file_data)))
    return [_effective(row) for row in rows]


def _leaves(node: Any, parts: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    if isinstance(node, Mapping) and node:
        for key, value in node.items():
            yield from _leaves(value, (*parts, str(key)))
    else:
        yield parts, node


def _has(data: Any, parts: tuple[str, ...]) -> bool:
    for part in parts:
        if not isinstance(data, Mapping) or part not in data:
            return False
        data = data[part]
    return True


def _source_of(parts: tuple[str, ...], env_data: Mapping[str, Any], file_data: Mapping[str, Any]) -> str:
    if _has(env_data, parts):
        return "env IMAGEN_" + "__".join(part.upper() for part in parts)
    return "file" if _has(file_data, parts) else "default"


def _effective(row: tuple[str, Any, str]) -> tuple[str, Any, str]:
    """The two settings whose winner is decided outside the model: the database URL, cloud sync."""
    key, value, _source = row
    if key == "database.url":
        if os.environ.get("IMAGEN_DATABASE_URL"):
            return key, value, "env IMAGEN_DATABASE_URL"
        if value is None and os.environ.get("DATABASE_URL"):
            return key, os.environ["DATABASE_URL"], "env DATABASE_URL"
        if value is None:
            return key, None, "default (the embedded server)"
    if key == "output.cloud_sync" and (raw := os.environ.get("IMAGEN_CLOUD_SYNC", "").strip()):
        return key, raw.lower(), "env IMAGEN_CLOUD_SYNC"
    return row
