"""The verification snippets in docs/operations.md accept what the worker sends, and only that."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from imagen_worker.webhooks.delivery import Request, Sender
from tests.webhooks.conftest import SECRET, Received, Receiver

OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def snippet(language: str) -> str:
    section = OPERATIONS.read_text().split("### Verifying the signature", 1)[1]
    found = re.search(rf"^```{language}\n(.*?)^```", section, flags=re.S | re.M)
    assert found, f"no {language} block in the Verifying section"
    return found.group(1)


async def signed_request(receiver: Receiver) -> Received:
    async with httpx.AsyncClient() as client:
        sender = Sender(client, receiver.url, SECRET.encode(), timeout=5)
        body = json.dumps({"id": "d-1", "event": "done", "job": {"status": "done"}}).encode()
        await sender.send(Request("d-1", "done", body))
    return receiver.requests[-1]


def tampered(request: Received) -> list[tuple[dict[str, str], bytes]]:
    headers = dict(request.headers)
    old = {**headers, "X-Imagen-Timestamp": str(int(headers["X-Imagen-Timestamp"]) - 600)}
    return [(headers, request.body + b" "), (old, request.body)]


async def test_the_python_snippet_verifies_a_real_delivery(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMAGEN_WEBHOOK_SECRET", SECRET)
    request = await signed_request(receiver)
    namespace: dict[str, Any] = {}
    exec(snippet("python"), namespace)
    headers = httpx.Headers(request.headers)  # case-insensitive, like a framework's
    assert namespace["verify"](headers, request.body) is True
    for bad_headers, bad_body in tampered(request):
        assert namespace["verify"](httpx.Headers(bad_headers), bad_body) is False


async def test_the_node_snippet_verifies_a_real_delivery(receiver: Receiver, tmp_path: Path) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    request = await signed_request(receiver)
    (tmp_path / "verify.mjs").write_text(snippet("js"))
    cases = [(dict(request.headers), request.body), *tampered(request)]
    (tmp_path / "cases.json").write_text(json.dumps(
        [{"headers": {k.lower(): v for k, v in h.items()}, "body": b.decode()} for h, b in cases]
    ))  # fmt: skip
    (tmp_path / "main.mjs").write_text(
        'import { verify } from "./verify.mjs";\n'
        'import fs from "node:fs";\n'
        'const cases = JSON.parse(fs.readFileSync("cases.json", "utf8"));\n'
        "console.log(JSON.stringify(cases.map((c) => verify(c.headers, Buffer.from(c.body)))));\n"
    )
    result = subprocess.run(
        [node, "main.mjs"], cwd=tmp_path, env={"IMAGEN_WEBHOOK_SECRET": SECRET},
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    assert json.loads(result.stdout) == [True, False, False]
