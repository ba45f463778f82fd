"""What the benchmarks share: the server they run on, and scratch directories that outlive
their benchmark under ``make bench``."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from bench import common
from bench.common import removals_deferred, scratch_directory, server_dsn

EMBEDDED = "postgresql://embedded@/postgres?host=/run/embedded"


@pytest.fixture
def no_configured_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IMAGEN_BENCH_DATABASE_URL", raising=False)
    monkeypatch.delenv("IMAGEN_TEST_DATABASE_URL", raising=False)
    monkeypatch.setattr(common, "_resolved_dsn", None)


@pytest.fixture
def listening_port() -> Iterator[int]:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server.getsockname()[1]


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port: int = unused.getsockname()[1]
    return port  # nothing listens there any more: a connection is refused


@pytest.mark.usefixtures("no_configured_server")
def test_a_server_answering_at_the_default_address_is_the_one_benchmarked(
    monkeypatch: pytest.MonkeyPatch, listening_port: int
) -> None:
    default = f"postgresql://postgres@127.0.0.1:{listening_port}/postgres"
    monkeypatch.setattr(common, "DEFAULT_DSN", default)
    assert server_dsn(fallback=lambda: EMBEDDED) == default


@pytest.mark.usefixtures("no_configured_server")
def test_with_no_server_anywhere_the_benchmarks_start_the_embedded_one_once(
    monkeypatch: pytest.MonkeyPatch, closed_port: int
) -> None:
    monkeypatch.setattr(common, "DEFAULT_DSN", f"postgresql://postgres@127.0.0.1:{closed_port}/postgres")
    started: list[str] = []

    def start_embedded() -> str:
        started.append(EMBEDDED)
        return EMBEDDED

    assert server_dsn(fallback=start_embedded) == EMBEDDED
    assert server_dsn(fallback=start_embedded) == EMBEDDED
    assert started == [EMBEDDED], "one embedded server per process"


def test_a_configured_server_wins_over_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEN_BENCH_DATABASE_URL", "postgresql://bench@db.internal/postgres")
    assert server_dsn(fallback=lambda: EMBEDDED) == "postgresql://bench@db.internal/postgres"


def test_a_scratch_directory_goes_with_its_benchmark_when_run_alone() -> None:
    with scratch_directory("imagen-test-scratch-") as path:
        (path / "image.png").write_bytes(b"png")
        assert path.is_dir()
    assert not path.exists()


def test_under_the_whole_suite_every_scratch_directory_goes_only_at_its_end() -> None:
    with removals_deferred():
        with scratch_directory("imagen-test-scratch-") as first:
            (first / "image.png").write_bytes(b"png")
        with scratch_directory("imagen-test-scratch-") as second:
            pass
        assert first.is_dir() and second.is_dir(), "the next benchmark meets no fresh removals"
    assert not first.exists() and not second.exists()
    with scratch_directory("imagen-test-scratch-") as alone:
        pass
    assert not alone.exists(), "after the suite, removal is immediate again"
