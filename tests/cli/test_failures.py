"""Every CLI failure, run as an operator meets it: one line on stderr, one exit code per cause.

The binaries run as subprocesses against the real PostgreSQL. With ``--log-format json`` the
worker's line is one JSON record, so ``journalctl -o cat | jq`` keeps working exactly when it
is needed; ``--debug`` brings the traceback back.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from imagen_worker.config import load_config
from imagen_worker.db.connect import describe_dsn
from imagen_worker.db.migrate import migrate
from tests.workers import BIN, running_worker, worker_env, write_config

DOWN = "postgresql://imagen:hunter2-secret@127.0.0.1:1/imagen"


def run(program: str, *args: str, dsn: str, config: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / program), *args], env={**worker_env(dsn, config), **env}, capture_output=True,
        text=True, timeout=60, check=False,
    )  # fmt: skip


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def one_json_line(result: subprocess.CompletedProcess[str]) -> dict[str, object]:
    """The last stderr line is the failure; any line before it is an ordinary JSON log line."""
    records = [json.loads(line) for line in result.stderr.splitlines()]
    assert records and all(isinstance(r, dict) for r in records), result.stderr
    failure: dict[str, object] = records[-1]
    assert failure["level"] == "error" and failure["exit_code"] == result.returncode
    return failure


def with_database(dsn: str, name: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{name}"))


def test_database_down_is_one_line_and_exit_69_for_every_command(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    for program, args in (("imagen", ["list"]), ("imagen-worker", ["migrate"]), ("imagen", ["submit", "x"])):
        result = run(program, *args, dsn=DOWN, config=config)
        assert result.returncode == 69, result.stderr
        line = one_line(result)
        assert line.startswith(f"{program}: cannot connect to the database at 127.0.0.1:1/imagen")
        assert "hunter2" not in line


def test_worker_start_failures_are_one_json_line_with_log_format_json(tmp_path: Path) -> None:
    config = write_config(tmp_path)

    result = run("imagen-worker", "run", "--log-format", "json", dsn=DOWN, config=config)

    assert result.returncode == 69
    failure = one_json_line(result)
    assert str(failure["event"]).startswith("cannot connect to the database at 127.0.0.1:1/imagen")
    assert "hunter2" not in result.stderr


def test_debug_brings_the_traceback_back(tmp_path: Path) -> None:
    result = run("imagen-worker", "--debug", "migrate", dsn=DOWN, config=write_config(tmp_path))

    assert result.returncode != 0
    assert "Traceback" in result.stderr


async def test_a_missing_database_is_exit_66_naming_it(database_url: str, tmp_path: Path) -> None:
    missing = with_database(database_url, f"imagen_absent_{uuid.uuid4().hex[:8]}")

    for program, args in (("imagen-worker", ["migrate"]), ("imagen", ["list"])):
        result = run(program, *args, dsn=missing, config=write_config(tmp_path))
        assert result.returncode == 66
        assert "does not exist; create it" in one_line(result)


async def test_an_edited_migration_is_exit_65(scratch_dsn: str, tmp_path: Path) -> None:
    conn = await asyncpg.connect(scratch_dsn)
    try:
        await migrate(conn)
        await conn.execute(
            "UPDATE imagen.schema_migrations SET checksum = 'edited' WHERE version LIKE '0001%'"
        )
    finally:
        await conn.close()

    result = run("imagen-worker", "migrate", dsn=scratch_dsn, config=write_config(tmp_path))

    assert result.returncode == 65
    assert "was changed after it was applied" in one_line(result)


async def test_a_schema_behind_is_exit_65_for_the_cli(scratch_dsn: str, tmp_path: Path) -> None:
    result = run("imagen", "list", dsn=scratch_dsn, config=write_config(tmp_path))

    assert result.returncode == 65
    assert "run `imagen-worker migrate`" in one_line(result)


@pytest.mark.parametrize("program", ["imagen", "imagen-worker"])
def test_a_mistyped_config_path_is_exit_78_for_every_command(program: str, tmp_path: Path) -> None:
    typo = tmp_path / "imagn.yaml"
    commands = {
        "imagen": [["list"], ["submit", "x"], ["config", "show"], ["backends"]],
        "imagen-worker": [["run"], ["check"], ["migrate"]],
    }
    for args in commands[program]:
        result = run(program, *args, "-c", str(typo), dsn=DOWN, config=write_config(tmp_path))
        assert result.returncode == 78, (args, result.stderr)
        assert str(typo) in result.stderr and "does not exist" in result.stderr
        assert len(result.stderr.splitlines()) == 1


def test_an_invalid_config_is_one_line_exit_78(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("worker: {concurrency: 0, lease_seconds: 1}\n", encoding="utf-8")

    result = run("imagen-worker", "run", "-c", str(bad), "--log-format", "json", dsn=DOWN, config=bad)

    assert result.returncode == 78
    event = str(one_json_line(result)["event"])
    assert "worker.concurrency" in event and "worker.lease_seconds" in event


async def test_a_taken_metrics_port_is_exit_71_before_the_worker_registers(
    database_url: str, db: asyncpg.Pool, tmp_path: Path
) -> None:
    config = write_config(tmp_path, metrics={"enabled": True, "host": "127.0.0.1", "port": 0})
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = run(
            "imagen-worker", "run", "--log-format", "json", dsn=database_url, config=config,
            IMAGEN_METRICS__PORT=port,
        )  # fmt: skip

    assert result.returncode == 71
    event = str(one_json_line(result)["event"])
    assert event.startswith(f"metrics.port: 127.0.0.1:{port} is already in use")
    assert "0 = any free port" in event
    assert await db.fetchval("SELECT count(*) FROM imagen.workers") == 0


async def test_missing_storage_credentials_are_exit_77(database_url: str, tmp_path: Path) -> None:
    config = write_config(tmp_path, storage={"type": "supabase", "bucket": "imagen-generated"})

    for program, args in (("imagen", ["generate", "x"]), ("imagen-worker", ["run", "--log-format", "json"])):
        result = run(program, *args, dsn=database_url, config=config)
        assert result.returncode == 77, result.stderr
        assert "SUPABASE_URL" in result.stderr.splitlines()[-1]


def test_a_refused_database_password_is_exit_77(tmp_path: Path, database_url: str) -> None:
    parts = urlsplit(database_url)
    address = parts.netloc.rpartition("@")[2]  # empty for a Unix socket named in the query
    nobody = urlunsplit(parts._replace(netloc=f"no_such_role_{uuid.uuid4().hex[:6]}@{address}"))

    result = run("imagen", "list", dsn=nobody, config=write_config(tmp_path))

    assert result.returncode == 77
    assert 'role "no_such_role' in one_line(result)


@pytest.mark.parametrize("url", ["http://db.internal/queue", "localhost:5432/queue", "user:secret@db/queue"])
def test_a_database_url_that_is_not_postgresql_is_a_config_error_that_does_not_echo_it(
    url: str, tmp_path: Path
) -> None:
    result = run("imagen", "list", dsn=url, config=write_config(tmp_path))

    assert result.returncode == 78
    assert one_line(result) == (
        "imagen: database.url (IMAGEN_DATABASE_URL) is not a PostgreSQL URL: "
        "write it as postgresql://USER@HOST:5432/DBNAME"
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["submit", "p", "--size", "100x100"], "multiples of 8 between 64 and 4096"),
        (["submit", "p", "--priority", "101"], "--priority 101: must be between -100 and 100"),
        (["submit", "p", "--steps", "0"], "--steps 0: must be between 1 and 200"),
        (["submit", "p", "--seed", "-1"], "--seed -1: must be between 0 and 9007199254740991"),
        (
            ["generate", "p", "--seed", "99999999999999999999"],
            "--seed 99999999999999999999: must be between 0 and",
        ),
        (
            ["submit", "p", "--style", "watercolour"],
            "--style 'watercolour' is not a style; did you mean 'watercolor'?",
        ),
        (
            ["generate", "p", "--style", "no-such"],
            "--style 'no-such' is not a style; `imagen styles` lists them",
        ),
        (["submit", "   "], "the prompt is empty"),
        (["generate", "bad \udcff bytes"], "the prompt is not valid UTF-8 text"),
        (["list", "--status", "bogus"], "use one of pending, running, done, failed, cancelled"),
        (["list", "--limit", "abc"], "'--limit'"),
        (["status", "not-a-uuid"], "not a job id"),
    ],
)
def test_bad_input_is_refused_before_the_database_with_the_allowed_range(
    args: list[str], expected: str, tmp_path: Path
) -> None:
    # DOWN: had the input reached the database, the error would be a connection failure.
    result = run("imagen", *args, dsn=DOWN, config=write_config(tmp_path))

    assert result.returncode == 64
    assert expected in one_line(result)


def test_version_on_both_programs(tmp_path: Path) -> None:
    for program in ("imagen", "imagen-worker"):
        result = run(program, "--version", dsn=DOWN, config=write_config(tmp_path))
        assert result.returncode == 0
        assert result.stdout.startswith(f"{program} ")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_submit_wait_says_no_worker_serves_it_and_ctrl_c_leaves_it_queued(
    sig: signal.Signals, database_url: str, db: asyncpg.Pool, tmp_path: Path
) -> None:
    config = write_config(tmp_path)
    proc = subprocess.Popen(
        [str(BIN / "imagen"), "submit", "an unserved fox", "--backend", "mock", "--wait"],
        env=worker_env(database_url, config), stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        said = _stderr_until(proc, "no live worker serves")
        assert f"no live worker serves backend 'mock' on {describe_dsn(database_url)}: " in said
        proc.send_signal(sig)
        _out, rest = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    job_id = await db.fetchval("SELECT id FROM imagen.jobs WHERE prompt = 'an unserved fox'")
    assert proc.returncode == 130
    assert f"it stays queued (cancel it with: imagen cancel {job_id})" in rest
    assert await db.fetchval("SELECT status FROM imagen.jobs WHERE id = $1", job_id) == "pending"


def _stderr_until(proc: subprocess.Popen[str], text: str, within: float = 20) -> str:
    assert proc.stderr is not None
    seen = []
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        seen.append(proc.stderr.readline())
        if text in seen[-1]:
            break
    return "".join(seen)


async def test_submit_wait_to_a_backend_no_live_worker_serves_names_what_they_serve(
    database_url: str, db: asyncpg.Pool, tmp_path: Path
) -> None:
    config = write_config(tmp_path)
    async with running_worker(load_config(config), database_url):
        proc = subprocess.Popen(
            [str(BIN / "imagen"), "submit", "a typo", "--backend", "mokc", "--wait"],
            env=worker_env(database_url, config), stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            said = await asyncio.to_thread(_stderr_until, proc, "no live worker serves")
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert "no live worker serves backend 'mokc' on " in said
    assert "(live workers serve: mock): the job stays queued" in said


async def test_check_run_and_validate_read_the_same_file_and_say_which(
    database_url: str, tmp_path: Path
) -> None:
    config = write_config(tmp_path)  # worker_env names it in $IMAGEN_CONFIG

    validated = run("imagen", "config", "validate", dsn=database_url, config=config)
    checked = run("imagen-worker", "check", dsn=database_url, config=config, COLUMNS="400")
    started = subprocess.Popen(
        [str(BIN / "imagen-worker"), "run", "--log-format", "json"], env=worker_env(database_url, config),
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert started.stderr is not None
        first = json.loads(started.stderr.readline())
    finally:
        started.send_signal(signal.SIGTERM)
        started.communicate(timeout=30)

    assert validated.stdout == f"ok: {config} (from $IMAGEN_CONFIG)\n"
    assert f"valid ({config}, from $IMAGEN_CONFIG)" in checked.stdout
    assert (first["event"], first["file"]) == ("configuration", f"{config} (from $IMAGEN_CONFIG)")


@pytest.mark.parametrize(("program", "args"), [("imagen", ["list"]), ("imagen", ["config", "show"])])
async def test_a_reader_that_stops_early_ends_the_command_without_a_word(
    program: str, args: list[str], database_url: str, db: asyncpg.Pool, tmp_path: Path
) -> None:
    """`imagen list | head -1`: the pipe's reader is gone before the table is written. Not
    "cannot connect to the database: Broken pipe", which a closed pipe was taken for."""
    await db.execute("INSERT INTO imagen.jobs (owner_user_id, prompt) VALUES ($1, 'listed')", uuid.uuid4())
    config = write_config(tmp_path)
    proc = subprocess.Popen(
        [str(BIN / program), *args], env=worker_env(database_url, config),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    proc.stdout.close()  # long before the interpreter has started and written anything
    _out, err = proc.communicate(timeout=60)
    assert err == ""
    assert proc.returncode == 1
