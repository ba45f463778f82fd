"""0005's Storage read policy: a key's first folder is its owner (``<owner id>/<job id>.<ext>``).

Same minimal ``storage`` schema as the 0003 tests. Objects stored before 0005 (date-named
keys) stay readable to the owner of their images row.
"""

from __future__ import annotations

import json
import uuid

import asyncpg

from imagen_worker.db.migrate import migrate
from tests.storage.test_supabase_migration import FAKE_STORAGE_SCHEMA, scratch  # noqa: F401 - fixture


async def test_a_user_reads_their_own_folder_and_their_legacy_images_only(
    scratch: asyncpg.Connection,  # noqa: F811 - the imported fixture
) -> None:
    await scratch.execute(FAKE_STORAGE_SCHEMA)
    await scratch.execute(
        "GRANT USAGE ON SCHEMA storage TO authenticated; GRANT SELECT ON storage.objects TO authenticated"
    )
    await migrate(scratch)
    alice, bob = uuid.uuid4(), uuid.uuid4()
    job_a, job_b = uuid.uuid4(), uuid.uuid4()
    await scratch.execute("INSERT INTO storage.buckets (id, name) VALUES ('other', 'other')")
    for bucket, key in [
        ("imagen-generated", f"{alice}/{job_a}.png"),
        ("imagen-generated", f"{bob}/{job_b}.png"),
        ("imagen-generated", "2026-05-11/alice-legacy.png"),
        ("imagen-generated", f"x{alice}/{job_a}.png"),
        ("other", f"{alice}/{job_a}.png"),
    ]:
        await scratch.execute("INSERT INTO storage.objects (bucket_id, name) VALUES ($1, $2)", bucket, key)
    await scratch.execute(
        """INSERT INTO imagen.images (owner_user_id, prompt, prompt_hash, backend, storage_path,
                                      mime_type, bytes, sha256)
           VALUES ($1, 'p', 'h', 'mock', '2026-05-11/alice-legacy.png', 'image/png', 1, repeat('a', 64))""",
        alice,
    )

    async def visible_to(user: uuid.UUID) -> list[str]:
        async with scratch.transaction():
            await scratch.execute("SET LOCAL ROLE authenticated")
            claims = json.dumps({"sub": str(user), "role": "authenticated"})
            await scratch.execute("SELECT set_config('request.jwt.claims', $1, true)", claims)
            rows = await scratch.fetch("SELECT bucket_id || ':' || name AS o FROM storage.objects ORDER BY 1")
        return [r["o"] for r in rows]

    assert await visible_to(alice) == sorted(
        [f"imagen-generated:{alice}/{job_a}.png", "imagen-generated:2026-05-11/alice-legacy.png"]
    )
    assert await visible_to(bob) == [f"imagen-generated:{bob}/{job_b}.png"]
    assert await visible_to(uuid.uuid4()) == []
