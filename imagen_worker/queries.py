"""Named statements from ``queries.sql``: the one place the runtime SQL lives.

Migrations are SQL files in ``migrations/``; everything the code runs against the database
is a named block in ``queries.sql``, so a reviewer reads the SQL as SQL.
"""

from __future__ import annotations

import re
from functools import cache
from importlib.resources import files

_BLOCK = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


@cache
def _load() -> dict[str, str]:
    text = files("imagen_worker").joinpath("queries.sql").read_text(encoding="utf-8")
    parts = _BLOCK.split(text)
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def sql(name: str) -> str:
    return _load()[name]
