"""What the benchmarks share: scratch directories that outlive their benchmark under ``make bench``."""

from __future__ import annotations

from bench.common import removals_deferred, scratch_directory


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
