"""Structured logging: readable on a terminal, JSON lines under systemd/docker, never a secret.

Every record, from structlog or from stdlib loggers (asyncpg, httpx, websockets), goes through
one ``ProcessorFormatter`` whose last steps are the redaction and the renderer. Redaction runs
after exceptions are turned into text, so a traceback that quotes a URL or a header is scrubbed
too; the console renderer gets that text instead of its rich traceback with local variables,
which would print secrets held in locals.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterable, Mapping
from typing import IO, Any, Literal

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

LogFormat = Literal["auto", "console", "json"]

MASK = "***"

# Environment variables whose values are secrets by name, besides the suffix rule below.
SECRET_ENV_NAMES = frozenset({"SUPABASE_SERVICE_KEY", "MAI_SUPABASE_KEY"})
_SECRET_ENV_SUFFIXES = ("_KEY", "_TOKEN", "_SECRET", "_PASSWORD")
# Shorter secret values are masked only when a field equals them; substring masking of a
# three-character value would shred ordinary text.
_MIN_SUBSTRING_SECRET = 8

# Field names whose values are secrets. ``api_key_env``-style names do not match: those
# values are the *names* of environment variables. ``dedupe_key``/``storage_key`` do not
# match either: only the listed words, optionally with a prefix (``x_api_key``).
_SECRET_FIELD = re.compile(
    r"^(?:.*_)?(?:authorization|proxy_authorization|api_?key|token|access_token|refresh_token|"
    r"id_token|password|passwd|secret|client_secret|service_key|service_role_key|private_key|"
    r"secret_key|access_key|cookie|set_cookie|credentials?)$",
    re.IGNORECASE,
)
_AUTH_SCHEME = re.compile(r"\b(Bearer|Basic|Token)\s+[A-Za-z0-9._~+/=-]+", re.IGNORECASE)
_QUERY_SECRET = re.compile(
    r"([?&](?:token|access_token|apikey|api_key|key|signature|sig|jwt|"
    r"x-amz-signature|x-amz-credential|x-amz-security-token)=)[^&#\s\"'<>]+",
    re.IGNORECASE,
)
_URL_PASSWORD = re.compile(r"([a-z][a-z0-9+.-]*://[^/\s:@]+:)[^@\s/]+@", re.IGNORECASE)
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]+")


def is_secret_env_name(name: str) -> bool:
    upper = name.upper()
    return upper in SECRET_ENV_NAMES or upper.endswith(_SECRET_ENV_SUFFIXES)


def config_secret_env_names(config: Any) -> set[str]:
    """Env var names a config points at for secrets, in its backend and storage blocks.

    Those are the values of ``*_env`` keys (``key_env: SUPABASE_SERVICE_KEY``) and of
    ``headers`` mappings (ComfyUI proxy headers: header -> variable name). Pass the result to
    ``configure_logging(secret_env=...)`` so a header kept in, say, ``COMFY_PROXY_AUTH`` is
    masked although its name has no secret-looking suffix.
    """
    names: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                if str(key).endswith("_env") or key == "headers":
                    if isinstance(value, str):
                        names.add(value)
                    elif isinstance(value, Mapping):
                        names.update(v for v in value.values() if isinstance(v, str))
                else:
                    walk(value)
        elif isinstance(node, list | tuple):
            for item in node:
                walk(item)

    walk(getattr(config, "backends", {}))
    walk(getattr(config, "storage", {}))
    return names


class Redactor:
    """A structlog processor that masks secrets anywhere in the event dict.

    The set of secret values is read from the environment once, when logging is configured:
    per-record environment scans would cost more than the logging itself.
    """

    def __init__(self, secret_values: Iterable[str] = ()) -> None:
        values = {v for v in secret_values if v}
        self._exact = frozenset(values)
        long_values = sorted((v for v in values if len(v) >= _MIN_SUBSTRING_SECRET), key=len, reverse=True)
        self._substring = re.compile("|".join(map(re.escape, long_values))) if long_values else None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, extra_names: Iterable[str] = ()) -> Redactor:
        env = os.environ if environ is None else environ
        wanted = {name.upper() for name in extra_names}
        return cls(value for name, value in env.items() if is_secret_env_name(name) or name.upper() in wanted)

    def scrub(self, text: str) -> str:
        if text in self._exact:
            return MASK
        if self._substring is not None:
            text = self._substring.sub(MASK, text)
        text = _AUTH_SCHEME.sub(lambda m: f"{m.group(1)} {MASK}", text)
        text = _QUERY_SECRET.sub(rf"\g<1>{MASK}", text)
        text = _URL_PASSWORD.sub(rf"\g<1>{MASK}@", text)
        return _JWT.sub(MASK, text)

    def redact(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.scrub(value)
        if value is None or isinstance(value, bool | int | float):
            return value
        if isinstance(value, Mapping):
            return {
                key: MASK if _SECRET_FIELD.match(str(key)) and value[key] else self.redact(value[key])
                for key in value
            }
        if isinstance(value, list | tuple | set | frozenset):
            return [self.redact(item) for item in value]
        # UUIDs, paths, exceptions, URL objects: their text is what gets rendered anyway.
        return self.scrub(str(value))

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
        for key, value in event_dict.items():
            event_dict[key] = MASK if _SECRET_FIELD.match(key) and value else self.redact(value)
        return event_dict


def _shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


def configure_logging(
    level: str = "info",
    fmt: LogFormat = "auto",
    *,
    stream: IO[str] | None = None,
    secret_env: Iterable[str] = (),
) -> None:
    """Route structlog and stdlib logging to ``stream`` (stderr), redacted.

    ``fmt="auto"`` renders for humans on a TTY and JSON lines otherwise (journald, docker).
    ``secret_env`` names extra environment variables whose values must never be printed
    (see ``config_secret_env_names``). Safe to call again: the handler is replaced.
    """
    out = stream if stream is not None else sys.stderr
    numeric = logging.getLevelNamesMapping().get(level.upper())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r} (debug, info, warning, error, critical)")
    if fmt not in ("auto", "console", "json"):
        raise ValueError(f"unknown log format {fmt!r} (auto, console, json)")
    use_console = fmt == "console" or (fmt == "auto" and out.isatty())

    renderer: Processor = (
        structlog.dev.ConsoleRenderer(colors=out.isatty())
        if use_console
        else structlog.processors.JSONRenderer(sort_keys=False)
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared_processors(),
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            structlog.processors.StackInfoRenderer(),
            Redactor.from_env(extra_names=secret_env),
            renderer,
        ],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(numeric)
    # httpx logs every request at INFO (health polls, every few seconds): only with debug.
    quiet = max(numeric, logging.WARNING)
    logging.getLogger("httpx").setLevel(numeric if numeric <= logging.DEBUG else quiet)

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_shared_processors(),
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
