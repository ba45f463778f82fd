"""What a job's owner reads in ``jobs.error``: one clean sentence, whatever the source said."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imagen_worker.errors import MAX_PUBLIC_CHARS, public_message, said


@pytest.mark.parametrize(
    ("raw", "public"),
    [
        (
            "storage upload failed after 5 attempt(s): HTTP 502 (502): <html><head><title>502 Bad Gateway"
            "</title></head><body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center>"
            "</body></html>",
            "storage upload failed after 5 attempt(s): HTTP 502 (502): 502 Bad Gateway",
        ),
        (
            "ComfyUI at http://10.0.0.5:8188 interrupted the prompt in node 3 (KSampler)",
            "ComfyUI interrupted the prompt in node 3 (KSampler)",
        ),
        (
            "ComfyUI failed in node 4 (CheckpointLoaderSimple): FileNotFoundError: "
            "/home/gpu/ComfyUI/models/x.safetensors not found",
            "ComfyUI failed in node 4 (CheckpointLoaderSimple): FileNotFoundError: a file not found",
        ),
        (
            "internal error: KeyError: 'x'\nTraceback (most recent call last):\n  File \"a.py\"",
            "internal error: KeyError: 'x'",
        ),
        ("could not reach gpu-1.lan:8188 (refused)", "could not reach an internal address (refused)"),
        (
            "ComfyUI did not finish within 8 s of starting (prompt 2588d392 on http://10.0.0.5:8188); "
            "it was interrupted",
            "ComfyUI did not finish within 8 s of starting (prompt 2588d392); it was interrupted",
        ),
        ("see https://gpu.lan/x, then retry", "see an internal address, then retry"),
        ("unknown style 'x'; known styles: anime, photo", "unknown style 'x'; known styles: anime, photo"),
        ("", "the job failed for a reason only the operator's log shows"),
    ],
)
def test_raw_errors_become_one_clean_sentence(raw: str, public: str) -> None:
    assert public_message(raw) == public


@given(
    st.text(max_size=300),
    st.sampled_from(
        ["http://10.1.2.3:8188/prompt", "https://abc.supabase.co/storage/v1", "/var/lib/imagen/x.png"]
    ),
    st.text(max_size=300),
)
def test_no_address_path_markup_or_second_line_survives(before: str, secret: str, after: str) -> None:
    public = public_message(f"{before} at {secret} <b>{after}</b>\n  File x")
    assert secret not in public and "<b>" not in public and "\n" not in public
    assert 0 < len(public) <= MAX_PUBLIC_CHARS


def test_an_exception_in_a_log_line_is_never_empty() -> None:
    assert said(TimeoutError()) == "TimeoutError", "a timeout's text is empty"
    assert said(ConnectionResetError("reset by peer")) == "reset by peer"
