"""The fake Storage API answers like the real one, so sink tests mean something."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.fakes.storage import FakeStorage

KEY = "2026-05-11/test-42.png"


@pytest.fixture
async def service(fake_storage: FakeStorage) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {fake_storage.service_key}", "apikey": fake_storage.service_key}
    async with httpx.AsyncClient(base_url=fake_storage.url + "/storage/v1", headers=headers) as client:
        yield client


async def _raw(fake: FakeStorage, request_line: str, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
    """Send a request target exactly as written (httpx would collapse dot segments)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", int(fake.url.rsplit(":", 1)[1]))
    lines = [request_line, "Host: fake", "Connection: close", "Content-Length: 1"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\nx").encode())
    await writer.drain()
    answer = await reader.read()
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


async def test_client_errors_are_http_400_with_a_string_status_code(service: httpx.AsyncClient) -> None:
    response = await service.get("/bucket/missing")

    assert response.status_code == 400
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == {
        "statusCode": "404",
        "error": "Bucket not found",
        "message": "Bucket not found",
        "code": "NoSuchBucket",
    }


async def test_put_is_an_upsert_that_keeps_the_id(
    service: httpx.AsyncClient, fake_storage: FakeStorage
) -> None:
    first = await service.put(
        f"/object/imagen-generated/{KEY}", content=b"one", headers={"x-upsert": "false"}
    )
    second = await service.put(f"/object/imagen-generated/{KEY}", content=b"two")

    assert first.json()["Key"] == f"imagen-generated/{KEY}"
    assert first.json()["Id"] == second.json()["Id"]
    assert fake_storage.get(KEY).data == b"two"  # type: ignore[union-attr]
    assert fake_storage.object_count() == 1


async def test_post_creates_and_upserts_only_with_lowercase_true(service: httpx.AsyncClient) -> None:
    created = await service.post(f"/object/imagen-generated/{KEY}", content=b"one")
    capitalised = await service.post(
        f"/object/imagen-generated/{KEY}", content=b"two", headers={"x-upsert": "True"}
    )
    upserted = await service.post(
        f"/object/imagen-generated/{KEY}", content=b"two", headers={"x-upsert": "true"}
    )

    assert created.status_code == 200
    assert capitalised.status_code == 400
    assert capitalised.json()["statusCode"] == "409"
    assert capitalised.json()["code"] == "KeyAlreadyExists"
    assert upserted.json()["Id"] == created.json()["Id"]


async def test_anon_writes_hit_row_level_security_and_missing_auth_is_named(
    fake_storage: FakeStorage,
) -> None:
    async with httpx.AsyncClient(base_url=fake_storage.url + "/storage/v1") as client:
        anon = await client.put(
            f"/object/imagen-generated/{KEY}",
            content=b"x",
            headers={"Authorization": f"Bearer {fake_storage.anon_key}"},
        )
        nobody = await client.put(f"/object/imagen-generated/{KEY}", content=b"x")
        private = await client.get(f"/object/imagen-generated/{KEY}")

    assert (anon.status_code, anon.json()["statusCode"], anon.json()["code"]) == (400, "403", "AccessDenied")
    assert anon.json()["message"] == "new row violates row-level security policy"
    assert nobody.json()["message"] == "headers must have required property 'authorization'"
    assert private.json()["code"] == "NoSuchBucket"


async def test_non_ascii_keys_and_raw_dot_segments_are_invalid_keys(
    service: httpx.AsyncClient, fake_storage: FakeStorage
) -> None:
    unicode_key = await service.put("/object/imagen-generated/2026-05-11/ünïcødé-画像.png", content=b"x")
    auth = {"Authorization": f"Bearer {fake_storage.service_key}"}
    status, body = await _raw(
        fake_storage, "PUT /storage/v1/object/imagen-generated/2026-05-11/../esc.png HTTP/1.1", auth
    )
    status_enc, body_enc = await _raw(
        fake_storage, "PUT /storage/v1/object/imagen-generated/2026-05-11/%2E%2E/esc.png HTTP/1.1", auth
    )

    assert unicode_key.json()["message"] == "Invalid key: 2026-05-11/ünïcødé-画像.png"
    assert (status, body["code"], status_enc, body_enc["code"]) == (400, "InvalidKey", 400, "InvalidKey")
    assert body["message"].endswith("contains dot path segment")
    assert fake_storage.object_count() == 0


async def test_signed_urls_are_relative_with_the_raw_key_and_an_hs256_token(
    service: httpx.AsyncClient, fake_storage: FakeStorage
) -> None:
    key = "2026-05-11/with space (1).png"
    await service.put(
        f"/object/imagen-generated/{key}", content=b"img", headers={"Content-Type": "image/png"}
    )

    signed = (await service.post(f"/object/sign/imagen-generated/{key}", json={"expiresIn": 60})).json()[
        "signedURL"
    ]

    path, _, token = signed.partition("?token=")
    assert path == f"/object/sign/imagen-generated/{key}"
    header, payload, _ = token.split(".")
    assert json.loads(base64.urlsafe_b64decode(header + "==")) == {"alg": "HS256"}
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["url"] == f"imagen-generated/{key}"
    assert claims["exp"] - claims["iat"] == 60
    async with httpx.AsyncClient() as anonymous:
        response = await anonymous.get(fake_storage.url + "/storage/v1" + signed)
    assert response.content == b"img"


async def test_sign_validates_expires_in(service: httpx.AsyncClient) -> None:
    await service.put(f"/object/imagen-generated/{KEY}", content=b"x")

    missing = await service.post(f"/object/sign/imagen-generated/{KEY}", json={})
    zero = await service.post(f"/object/sign/imagen-generated/{KEY}", json={"expiresIn": 0})

    assert missing.json()["message"] == "body must have required property 'expiresIn'"
    assert zero.json()["message"] == "body/expiresIn must be >= 1"


async def test_buckets_can_be_read_and_created_once(service: httpx.AsyncClient) -> None:
    bucket = (await service.get("/bucket/imagen-generated")).json()
    created = await service.post("/bucket", json={"id": "other", "name": "other", "public": False})
    again = await service.post("/bucket", json={"id": "other", "name": "other", "public": False})

    assert (bucket["id"], bucket["public"]) == ("imagen-generated", False)
    assert created.json() == {"name": "other"}
    assert again.json()["code"] == "BucketAlreadyExists"


async def test_requests_outside_storage_v1_get_the_gateways_404(fake_storage: FakeStorage) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.get(fake_storage.url + "/object/imagen-generated/x.png")

    assert response.status_code == 404


async def test_knobs_fail_drop_and_slow_down_matching_requests(
    service: httpx.AsyncClient, fake_storage: FakeStorage
) -> None:
    fake_storage.fail_next(1, status=500, methods=["PUT"])
    fake_storage.fail_next(1, status="drop")

    failed = await service.put(f"/object/imagen-generated/{KEY}", content=b"x")
    with pytest.raises(httpx.RemoteProtocolError):
        await service.put(f"/object/imagen-generated/{KEY}", content=b"x")
    fake_storage.upload_latency = 0.05
    loop = asyncio.get_running_loop()
    started = loop.time()
    ok = await service.put(f"/object/imagen-generated/{KEY}", content=b"x")

    assert (failed.status_code, failed.json()["statusCode"]) == (500, "500")
    assert ok.status_code == 200
    assert loop.time() - started >= 0.05
    assert fake_storage.put_count(KEY) == 1
    assert [r.status for r in fake_storage.requests] == [500, None, 200]
