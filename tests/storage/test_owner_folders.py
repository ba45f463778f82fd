"""0005's Storage read policy: a key's first folder is its owner (``<owner id>/<job id>.<ext>``).

Same minimal ``storage`` schema as the 0003 tests. Objects stored before 0005 (date-named
keys) stay readable to the owner of their images row.
"""

from __future__ import annotations

import uuid

import asyncpg

from tests.storage.test_supabase_migration import (  # noqa: F401 - scratch is a fixture
    migrated_with_storage,
    objects_visible_to,
    scratch,
)


async def test_a_user_reads_their_own_folder_and_their_legacy_images_only(
    scratch: asyncpg.Connection,  # noqa: F811 - the imported fixture
) -> None:
    await migrated_with_storage(scratch)
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

    assert await objects_visible_to(scratch, alice) == sorted(
        [("imagen-generated", f"{alice}/{job_a}.png"), ("imagen-generated", "2026-05-11/alice-legacy.png")]
    )
    assert await objects_visible_to(scratch, bob) == [("imagen-generated", f"{bob}/{job_b}.png")]
    assert await objects_visible_to(scratch, uuid.uuid4()) == []
