"""Hostile input, the way the web UI sends it, and row-level security under random users.

Jobs are INSERTed like PostgREST does it: one transaction, ``SET LOCAL ROLE authenticated``
and the caller's JWT claims via ``set_config('request.jwt.claims', ..., true)``, only the
columns the role may write. Every hostile row must either be refused at INSERT (a constraint,
a data error, a privilege error: PostgreSQL refuses NUL bytes in text by itself) or, once
accepted, end ``done`` or ``failed`` with a readable error, while an in-process worker keeps
serving: a good job sent after each batch of hostile ones is done.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from imagen_worker.config import load_config
from imagen_worker.worker.daemon import Worker

REFUSED = (asyncpg.IntegrityConstraintViolationError, asyncpg.DataError, asyncpg.InsufficientPrivilegeError)
TERMINAL = ("done", "failed", "cancelled")
WEB_COLUMNS = (
    "prompt",
    "negative_prompt",
    "backend",
    "style",
    "width",
    "height",
    "steps",
    "seed",
    "params",
    "dedupe_key",
)

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)


@asynccontextmanager
async def request_as(
    pool: asyncpg.Pool, sub: uuid.UUID | str | None, role: str = "authenticated"
) -> AsyncIterator[asyncpg.Connection]:
    """One PostgREST-style request: a transaction as ``role`` with ``sub`` in the JWT claims."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(f"SET LOCAL ROLE {role}")
        if sub is not None:
            claims = json.dumps({"sub": str(sub), "role": role})
            await conn.execute("SELECT set_config('request.jwt.claims', $1, true)", claims)
        yield conn


async def web_insert(pool: asyncpg.Pool, owner: uuid.UUID, row: dict[str, Any]) -> uuid.UUID:
    columns = ["owner_user_id", *row]
    values = [owner, *row.values()]
    placeholders = ", ".join(f"${i}" for i in range(1, len(values) + 1))
    async with request_as(pool, owner) as conn:
        job_id: uuid.UUID = await conn.fetchval(
            f"INSERT INTO imagen.jobs ({', '.join(columns)}) VALUES ({placeholders}) RETURNING id", *values
        )
    return job_id


async def wait_terminal(
    pool: asyncpg.Pool, ids: list[uuid.UUID], timeout: float = 40.0
) -> list[asyncpg.Record]:
    deadline = time.monotonic() + timeout
    while True:
        rows: list[asyncpg.Record] = await pool.fetch(
            "SELECT id, status, error, image_id FROM imagen.jobs WHERE id = ANY($1::uuid[])", ids
        )
        if all(row["status"] in TERMINAL for row in rows) or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.02)


# --- strategies --------------------------------------------------------------------------

SQLISH = [
    "'; DROP TABLE imagen.jobs; --",
    '" OR 1=1 --',
    "$$; SELECT pg_sleep(10); $$",
    "'); DELETE FROM imagen.images WHERE ('1'='1",
    "../../../../etc/passwd",
    "{prompt}{date}{../}",
    "%s%s%n\\x00\\0",
    "<script>alert(1)</script>",
]
text_no_surrogates = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=120
)
huge = st.builds(
    lambda n, ch: ch * n, st.integers(7990, 30_000), st.sampled_from(["a", "é", "画", "\U0001f600", " "])
)
with_nul = st.builds(lambda a, b: f"{a}\x00{b}", text_no_surrogates, text_no_surrogates)
blank = st.sampled_from(["", " ", "\t\n", "\u00a0\u3000", "\u200b\ufeff", "\u2028"])
prompts = st.one_of(text_no_surrogates, huge, with_nul, blank, st.sampled_from(SQLISH), st.none())
names = st.one_of(
    st.none(),
    st.sampled_from(["mock", "photo", "anime", "comfyui", "", "x" * 65, "MOCK", "mock ", "no-such-backend"]),
    text_no_surrogates,
    with_nul,
    st.sampled_from(SQLISH),
)
sizes = st.one_of(
    st.sampled_from([64, 128, 512]),
    st.sampled_from([64, 512, 1024, 1001, 63, 4097, 0, -64, 520]),
    st.integers(-(2**31), 2**31 - 1),
    st.integers(2**31, 2**40),
)
json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        text_no_surrogates,
    ),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text_no_surrogates, inner, max_size=4),
    max_leaves=12,
)
params = st.one_of(
    st.just({}),
    st.sampled_from([{"mock_fail": "terminal"}, {"mock_fail": "retryable"}, {"mock_fail": 1}, {"steps": 9}]),
    st.dictionaries(text_no_surrogates, json_values, max_size=5),
    st.lists(json_values, max_size=3),
    json_values,
    st.builds(lambda n: {"blob": "z" * n}, st.integers(60_000, 120_000)),
    st.builds(lambda s: {"k": f"nul\x00{s}"}, text_no_surrogates),
)
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "prompt": prompts,
    "negative_prompt": st.one_of(st.none(), text_no_surrogates, huge, with_nul),
    "backend": names,
    "style": names,
    "width": sizes,
    "height": sizes,
    "steps": st.one_of(st.none(), st.integers(-5, 250), st.integers(2**31, 2**33)),
    "seed": st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1), st.just(2**53), st.just(2**64)),
    "params": params,
    "dedupe_key": st.one_of(st.none(), st.text(max_size=250), st.just("same-key")),
}
# A plausible request with one or two hostile fields, so rows get past the INSERT often enough
# for the worker to meet them, plus rows where any subset of the fields is hostile.
mutated = st.lists(st.sampled_from(sorted(FIELDS)), min_size=1, max_size=2, unique=True).flatmap(
    lambda keys: st.fixed_dictionaries({key: FIELDS[key] for key in keys})
)
hostile_rows = st.one_of(
    st.builds(
        lambda prompt, overrides: {"prompt": prompt, "width": 64, "height": 64, **overrides},
        st.one_of(st.sampled_from(["a lighthouse at dusk", "画 \U0001f600"]), text_no_surrogates),
        mutated,
    ),
    st.fixed_dictionaries({}, optional=FIELDS),
)


# --- the worker ------------------------------------------------------------------------------


@pytest.fixture
async def worker(
    db: asyncpg.Pool, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Worker, asyncio.Task[None]]]:
    config_file = tmp_path / "imagen.yaml"
    config_file.write_text(
        yaml.safe_dump({"backends": {"mock": {"type": "mock", "latency_ms": 0, "capacity": 8}}}),
        encoding="utf-8",
    )
    monkeypatch.setenv("IMAGEN_CONFIG", str(config_file))
    monkeypatch.setenv("IMAGEN_OUTPUT__DIRECTORY", str(tmp_path / "images"))
    monkeypatch.setenv("IMAGEN_CLOUD_SYNC", "off")
    monkeypatch.setenv("IMAGEN_WORKER__CONCURRENCY", "8")
    monkeypatch.setenv("IMAGEN_WORKER__POLL_INTERVAL", "0.5")
    monkeypatch.setenv("IMAGEN_WORKER__RETRY_BASE_SECONDS", "0.02")
    monkeypatch.setenv("IMAGEN_WORKER__RETRY_MAX_SECONDS", "0.05")
    monkeypatch.setenv("IMAGEN_WORKER__SHUTDOWN_GRACE", "5")
    monkeypatch.setenv("IMAGEN_WORKER__ORPHAN_AFTER", "0")  # unknown backends fail at once here
    worker = Worker(load_config(), database_url, run_migrations=False)
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(worker.ready.wait(), 30)
        yield worker, task
    finally:
        worker.request_stop()
        try:
            await asyncio.wait_for(asyncio.shield(task), 20)
        except TimeoutError:
            worker.request_stop()
            await asyncio.wait_for(task, 20)


@SETTINGS
@given(batch=st.lists(hostile_rows, min_size=1, max_size=4))
async def test_hostile_jobs_are_refused_or_end_readably(
    db: asyncpg.Pool, worker: tuple[Worker, asyncio.Task[None]], batch: list[dict[str, Any]]
) -> None:
    _, task = worker
    owner = uuid.uuid4()
    accepted: list[uuid.UUID] = []
    for row in batch:
        try:
            accepted.append(await web_insert(db, owner, row))
        except REFUSED as exc:
            assert str(exc), "a refusal must say why"
            event(f"refused at INSERT: {type(exc).__name__}")
    for job in await wait_terminal(db, accepted):
        assert job["status"] in ("done", "failed"), dict(job)
        event(f"accepted, ended {job['status']}")
        if job["status"] == "failed":
            error = job["error"]
            assert error and error.strip() and "\x00" not in error, dict(job)
        else:
            image = await db.fetchrow("SELECT job_id FROM imagen.images WHERE id = $1", job["image_id"])
            assert image is not None and image["job_id"] == job["id"]

    good = await web_insert(db, owner, {"prompt": "a good job after hostile ones", "width": 64, "height": 64})
    (row,) = await wait_terminal(db, [good])
    assert row["status"] == "done", dict(row)
    assert not task.done(), "the worker must keep running"


async def test_typical_hostile_rows_take_every_path(
    db: asyncpg.Pool, worker: tuple[Worker, asyncio.Task[None]]
) -> None:
    """One fixed example of each outcome, so the property above is known to reach all of them."""
    owner = uuid.uuid4()
    with pytest.raises(asyncpg.CharacterNotInRepertoireError):
        await web_insert(db, owner, {"prompt": "nul\x00byte"})
    with pytest.raises(asyncpg.CheckViolationError):
        await web_insert(db, owner, {"prompt": "x" * 8001})
    with pytest.raises(asyncpg.CheckViolationError):
        await web_insert(db, owner, {"prompt": "odd size", "width": 1001})
    with pytest.raises(asyncpg.NotNullViolationError):
        await web_insert(db, owner, {"prompt": None})
    with pytest.raises(asyncpg.DataError):
        await web_insert(db, owner, {"prompt": "too wide for int4", "width": 2**31})
    unknown_backend = await web_insert(db, owner, {"prompt": "p", "backend": "'; DROP TABLE imagen.jobs; --"})
    unknown_style = await web_insert(db, owner, {"prompt": "p", "style": "no-such-style"})
    bogus_params = await web_insert(db, owner, {"prompt": "p", "params": {"evil": "$$"}})
    fine = await web_insert(
        db, owner, {"prompt": "画 \U0001f600 ../../etc/passwd", "width": 64, "height": 64}
    )
    rows = {
        row["id"]: row
        for row in await wait_terminal(db, [unknown_backend, unknown_style, bogus_params, fine])
    }
    assert rows[fine]["status"] == "done"
    for job_id, needle in (
        (unknown_backend, "unknown backend"),
        (unknown_style, "unknown style"),
        (bogus_params, "evil"),
    ):
        assert rows[job_id]["status"] == "failed"
        assert needle in rows[job_id]["error"]
    assert await db.fetchval("SELECT count(*) FROM imagen.jobs") == 4


# --- row-level security -----------------------------------------------------------------------


async def _seed(
    pool: asyncpg.Pool, owners: list[uuid.UUID], jobs: list[int], images: list[int]
) -> dict[uuid.UUID, dict[str, set[uuid.UUID]]]:
    await pool.execute("TRUNCATE imagen.jobs, imagen.images, imagen.workers CASCADE")
    owned: dict[uuid.UUID, dict[str, set[uuid.UUID]]] = {}
    for owner, n_jobs, n_images in zip(owners, jobs, images, strict=True):
        job_ids = {
            await pool.fetchval(
                "INSERT INTO imagen.jobs (owner_user_id, prompt) VALUES ($1, $2) RETURNING id",
                owner,
                f"job {i}",
            )
            for i in range(n_jobs)
        }
        image_ids = {
            await pool.fetchval(
                """INSERT INTO imagen.images (owner_user_id, prompt, prompt_hash, backend, storage_path,
                                              mime_type, bytes, sha256)
                   VALUES ($1, 'p', 'h', 'mock', $2, 'image/png', 1, $3) RETURNING id""",
                owner,
                f"{uuid.uuid4().hex}.png",
                "0" * 64,
            )
            for _ in range(n_images)
        }
        owned[owner] = {"jobs": job_ids, "images": image_ids}
    return owned


async def _refused(pool: asyncpg.Pool, sub: uuid.UUID, statement: str, *args: Any) -> bool:
    try:
        async with request_as(pool, sub) as conn:
            await conn.execute(statement, *args)
    except asyncpg.InsufficientPrivilegeError:
        return True
    return False


@SETTINGS
@given(
    data=st.data(),
    n_users=st.integers(2, 4),
)
async def test_nobody_reads_or_changes_another_owners_rows(
    db: asyncpg.Pool, data: st.DataObject, n_users: int
) -> None:
    owners = [uuid.UUID(int=data.draw(st.integers(1, 2**122), label="uid") << 4 | 4) for _ in range(n_users)]
    owners = list(dict.fromkeys(owners))
    jobs = data.draw(st.lists(st.integers(0, 3), min_size=len(owners), max_size=len(owners)), label="jobs")
    images = data.draw(
        st.lists(st.integers(0, 2), min_size=len(owners), max_size=len(owners)), label="images"
    )
    owned = await _seed(db, owners, jobs, images)
    outsider = uuid.uuid4()

    for reader in [*owners, outsider]:
        mine = owned.get(reader, {"jobs": set(), "images": set()})
        async with request_as(db, reader) as conn:
            seen_jobs = {r["id"] for r in await conn.fetch("SELECT id FROM imagen.jobs")}
            seen_images = {r["id"] for r in await conn.fetch("SELECT id FROM imagen.images")}
        assert seen_jobs == mine["jobs"]
        assert seen_images == mine["images"]

        for other, theirs in owned.items():
            if other == reader:
                continue
            for job_id in theirs["jobs"]:
                async with request_as(db, reader) as conn:
                    # The one column users may update: RLS makes another owner's row invisible.
                    assert (
                        await conn.execute(
                            "UPDATE imagen.jobs SET cancel_requested = true WHERE id = $1", job_id
                        )
                        == "UPDATE 0"
                    )
                    assert await conn.fetchval("SELECT count(*) FROM imagen.jobs WHERE id = $1", job_id) == 0
                assert await _refused(
                    db, reader, "UPDATE imagen.jobs SET status = 'done' WHERE id = $1", job_id
                )
                assert await _refused(
                    db, reader, "UPDATE imagen.jobs SET owner_user_id = $2 WHERE id = $1", job_id, reader
                )
                assert await _refused(db, reader, "DELETE FROM imagen.jobs WHERE id = $1", job_id)
            for image_id in theirs["images"]:
                assert await _refused(db, reader, "DELETE FROM imagen.images WHERE id = $1", image_id)
                assert await _refused(
                    db, reader, "UPDATE imagen.images SET owner_user_id = $2 WHERE id = $1", image_id, reader
                )
            # Filing a job in someone else's name is refused by the policy's WITH CHECK.
            assert await _refused(
                db, reader, "INSERT INTO imagen.jobs (owner_user_id, prompt) VALUES ($1, 'impostor')", other
            )

    # Requests without a user see nothing; the anon role may not even look.
    async with request_as(db, None) as conn:
        assert await conn.fetchval("SELECT count(*) FROM imagen.jobs") == 0
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        async with request_as(db, owners[0], role="anon") as conn:
            await conn.fetch("SELECT id FROM imagen.jobs")

    # Nothing changed underneath: every job is still pending, uncancelled, with its owner.
    rows = await db.fetch("SELECT owner_user_id, status, cancel_requested FROM imagen.jobs")
    assert len(rows) == sum(jobs[: len(owners)])
    assert all(row["status"] == "pending" and not row["cancel_requested"] for row in rows)
    assert await db.fetchval("SELECT count(*) FROM imagen.images") == sum(images[: len(owners)])
    for owner, theirs in owned.items():
        assert {
            r["id"] for r in await db.fetch("SELECT id FROM imagen.jobs WHERE owner_user_id = $1", owner)
        } == theirs["jobs"]
