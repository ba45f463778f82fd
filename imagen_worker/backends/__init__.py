"""Backend registry: ``type`` name -> adapter class, imported lazily.

The framework reads only ``type`` from a backend's config block and hands the whole block to
the adapter. Built-ins are imported on first use so a worker that runs only the mock backend
never imports the websocket client; third-party adapters register through the
``imagen_worker.backends`` entry-point group.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any

from imagen_worker.backends.base import Backend
from imagen_worker.errors import ConfigError

_BUILTIN = {
    "mock": "imagen_worker.backends.mock:MockBackend",
    "comfyui": "imagen_worker.backends.comfyui:ComfyUIBackend",
}


def available_types() -> list[str]:
    names = set(_BUILTIN) | {ep.name for ep in entry_points(group="imagen_worker.backends")}
    return sorted(names)


def adapter_class(type_name: str) -> type[Backend]:
    target = _BUILTIN.get(type_name)
    if target is None:
        for ep in entry_points(group="imagen_worker.backends"):
            if ep.name == type_name:
                cls: type[Backend] = ep.load()
                return cls
        raise ConfigError(f"unknown backend type {type_name!r} (known: {', '.join(available_types())})")
    module, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    loaded: type[Backend] = cls
    return loaded


def create(name: str, block: Mapping[str, Any]) -> Backend:
    """Build one configured backend instance from its block."""
    type_name = block.get("type")
    if not isinstance(type_name, str) or not type_name:
        raise ConfigError(f'backend "{name}": missing "type" (one of: {", ".join(available_types())})')
    return adapter_class(type_name).from_config(name, block)
