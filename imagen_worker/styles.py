"""Style presets from the embedded ``styles.yaml``."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib.resources import files

import yaml

from imagen_worker.errors import TerminalError


@dataclass(frozen=True)
class Style:
    name: str
    description: str
    prompt: str
    negative: str


@cache
def all_styles() -> dict[str, Style]:
    raw = yaml.safe_load(files("imagen_worker").joinpath("styles.yaml").read_text(encoding="utf-8"))
    return {
        name: Style(name, block["description"], block["prompt"], block.get("negative", ""))
        for name, block in raw.items()
    }


def apply(style: str | None, prompt: str, negative: str | None) -> tuple[str, str | None]:
    """The styled prompt and negative prompt; an unknown style fails the job in words."""
    if not style:
        return prompt, negative
    preset = all_styles().get(style)
    if preset is None:
        known = ", ".join(sorted(all_styles()))
        raise TerminalError(f"unknown style {style!r}; known styles: {known}", detail={"style": style})
    styled = preset.prompt.replace("{prompt}", prompt)
    merged = ", ".join(part for part in (negative, preset.negative) if part) or None
    return styled, merged
