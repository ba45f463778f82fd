"""What ``imagen submit --wait`` shows beside its progress bar while the job runs."""

from __future__ import annotations

from imagen_worker.cli.watch import running_label
from imagen_worker.storage import outage


def test_a_running_job_shows_the_backends_step_count() -> None:
    assert running_label({"value": 12, "max": 30, "stage": "sampling"}) == "running 12/30"


def test_a_finished_render_waiting_for_storage_says_why_instead_of_1_of_1() -> None:
    progress = {"value": 1.0, "max": 1, "stage": "waiting_for_storage", "message": outage.WAITING_MESSAGE}
    assert running_label(progress) == f"running: {outage.WAITING_MESSAGE}"
