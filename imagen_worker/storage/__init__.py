"""Storage sinks: registry by ``type``, and the cloud-sync decision.

Built-ins are imported on first use (a local-only worker never imports httpx's TLS stack for
storage); third-party sinks register through the ``imagen_worker.storage`` entry-point group.

Whether images go to the cloud is decided once, here, from this chain (highest first):
``--no-cloud`` > ``$IMAGEN_CLOUD_SYNC`` > ``output.cloud_sync`` (file or
``IMAGEN_OUTPUT__CLOUD_SYNC``) > ``auto``. ``auto`` uploads only when the configured cloud
sink's credentials are in the environment, so a fresh install works offline.
"""

from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Literal, cast

from imagen_worker.config import SWITCH_WORDS
from imagen_worker.errors import ConfigError
from imagen_worker.storage.base import StorageSink, StoredObject
from imagen_worker.storage.keys import InvalidStorageKey, MissingCredentials

if TYPE_CHECKING:
    from imagen_worker.config import Config

__all__ = [
    "InvalidStorageKey",
    "MissingCredentials",
    "StorageSink",
    "StoredObject",
    "available_types",
    "create_sink",
    "effective_cloud_sync",
    "owner_warning",
    "sink_class",
]

CloudSyncMode = Literal["on", "off", "auto"]
CLOUD_SYNC_ENV = "IMAGEN_CLOUD_SYNC"
_MODES: tuple[CloudSyncMode, ...] = ("auto", "on", "off")

_BUILTIN = {
    "local": "imagen_worker.storage.local:LocalSink",
    "supabase": "imagen_worker.storage.supabase:SupabaseSink",
}
_GROUP = "imagen_worker.storage"


def available_types() -> list[str]:
    return sorted(set(_BUILTIN) | {ep.name for ep in entry_points(group=_GROUP)})


def sink_class(type_name: str) -> type[StorageSink]:
    target = _BUILTIN.get(type_name)
    if target is None:
        for ep in entry_points(group=_GROUP):
            if ep.name == type_name:
                cls: type[StorageSink] = ep.load()
                return cls
        raise ConfigError(f"storage: unknown type {type_name!r} (known: {', '.join(available_types())})")
    module, _, attr = target.partition(":")
    return cast("type[StorageSink]", getattr(importlib.import_module(module), attr))


def effective_cloud_sync(config: Config, *, no_cloud: bool = False) -> CloudSyncMode:
    """The cloud-sync mode after the precedence chain; an invalid ``$IMAGEN_CLOUD_SYNC`` is refused."""
    if no_cloud:
        return "off"
    raw = os.environ.get(CLOUD_SYNC_ENV)
    if raw is not None and raw.strip():
        value = raw.strip().lower()
        value = SWITCH_WORDS.get(value, value)  # on/off the way the config file takes them
        if value not in _MODES:
            raise ConfigError(f"${CLOUD_SYNC_ENV}={raw!r}: use auto, on or off")
        return value
    configured = config.output.cloud_sync
    return configured if configured in _MODES else "auto"


def _configured_block(config: Config) -> dict[str, object]:
    block = dict(config.storage or {})
    type_name = block.get("type")
    if not isinstance(type_name, str) or not type_name:
        raise ConfigError(f'storage: missing "type" (one of: {", ".join(available_types())})')
    return block


def _local(config: Config) -> StorageSink:
    """The local sink, honouring a configured ``type: local`` block's directory."""
    from imagen_worker.storage.local import LocalSink

    block = dict(config.storage or {})
    if block.get("type") != LocalSink.type_name:
        block = {"type": LocalSink.type_name}
    return LocalSink.from_config(block, output_directory=config.output.directory)


def create_sink(config: Config, *, no_cloud: bool = False) -> StorageSink:
    """The sink this run uses: local when off, the configured sink when on, either when auto.

    ``on`` with missing credentials is a ``ConfigError`` naming the environment variables;
    ``auto`` quietly falls back to local. Other problems in the block fail in every mode but
    ``off``, so a typo never silently turns uploads off.
    """
    mode = effective_cloud_sync(config, no_cloud=no_cloud)
    if mode == "off":
        return _local(config)
    block = _configured_block(config)
    cls = sink_class(str(block["type"]))
    try:
        return cls.from_config(block, output_directory=config.output.directory)
    except MissingCredentials:
        if mode == "on":
            raise
        return _local(config)


def owner_warning(config: Config, *, no_cloud: bool = False) -> str | None:
    """Warn when uploads will happen but no owner is set, so nobody could see the images.

    ``on`` always warns without an owner; ``auto`` warns only when it resolves to the cloud
    (credentials present), so an offline install is not nagged.
    """
    owner = config.owner_user_id or os.environ.get("IMAGEN_OWNER_USER_ID", "").strip()
    if owner:
        return None
    mode = effective_cloud_sync(config, no_cloud=no_cloud)
    if mode == "off":
        return None
    if mode == "auto":
        try:
            if not create_sink(config, no_cloud=no_cloud).is_cloud:
                return None
        except ConfigError:
            pass
    return (
        f"cloud sync is {mode} but no owner is set (owner_user_id in the config file or "
        "$IMAGEN_OWNER_USER_ID): images uploaded from here belong to no web-app user, "
        "so no signed-in user can see them"
    )
