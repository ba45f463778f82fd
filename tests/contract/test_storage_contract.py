"""Supabase Storage answers the same way from the fake and from the real server.

Each scenario is something the Supabase sink relies on: upserts that keep the object, error
bodies carrying the real status as a string, signed URLs that download without a key.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from imagen_worker.errors import TerminalError
from imagen_worker.storage.base import ObjectNotFound, ObjectTooLarge
from imagen_worker.storage.supabase import SupabaseSink
from tests.contract.conftest import FullStorage, StoragePeer


@pytest.fixture
async def api(storage: StoragePeer) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {storage.service_key}", "apikey": storage.service_key}
    async with httpx.AsyncClient(base_url=f"{storage.url}/storage/v1", headers=headers) as client:
        created = await client.post("/bucket", json={"id": storage.bucket, "name": storage.bucket})
        assert created.status_code in (200, 400), created.text  # the fake already has its bucket
        yield client


async def _sign(api: httpx.AsyncClient, storage: StoragePeer, key: str) -> str:
    answer = await api.post(f"/object/sign/{storage.bucket}/{key}", json={"expiresIn": 60})
    signed: str = answer.json()["signedURL"]
    return signed


def _key(name: str) -> str:
    return f"{uuid.uuid4()}/{name}"


async def test_put_is_an_upsert_that_keeps_the_object_id(
    api: httpx.AsyncClient, storage: StoragePeer
) -> None:
    key = _key("image.png")

    first = await api.put(f"/object/{storage.bucket}/{key}", content=b"one", headers={"x-upsert": "true"})
    second = await api.put(f"/object/{storage.bucket}/{key}", content=b"two", headers={"x-upsert": "true"})
    stored = await api.get(f"/object/{storage.bucket}/{key}")

    assert (first.status_code, second.status_code) == (200, 200)
    assert first.json()["Key"] == f"{storage.bucket}/{key}"
    assert first.json()["Id"] == second.json()["Id"]
    assert stored.content == b"two"


async def test_post_on_an_existing_key_is_a_400_carrying_409(
    api: httpx.AsyncClient, storage: StoragePeer
) -> None:
    key = _key("image.png")

    created = await api.post(f"/object/{storage.bucket}/{key}", content=b"one")
    again = await api.post(f"/object/{storage.bucket}/{key}", content=b"two")

    assert created.status_code == 200
    assert again.status_code == 400
    assert (again.json()["statusCode"], again.json()["error"]) == ("409", "Duplicate")


async def test_a_missing_bucket_is_a_400_carrying_404(api: httpx.AsyncClient) -> None:
    response = await api.put(f"/object/no-such-bucket-{uuid.uuid4().hex[:6]}/a.png", content=b"x")

    assert response.status_code == 400
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["statusCode"] == "404"
    assert response.json()["error"] == "Bucket not found"


async def test_a_missing_object_is_a_400_carrying_404(api: httpx.AsyncClient, storage: StoragePeer) -> None:
    response = await api.get(f"/object/{storage.bucket}/{_key('missing.png')}")

    assert response.status_code == 400
    assert response.json()["statusCode"] == "404"
    assert response.json()["error"] == "not_found"


async def test_a_request_without_authorization_is_refused_in_words(storage: StoragePeer) -> None:
    async with httpx.AsyncClient(base_url=f"{storage.url}/storage/v1") as anonymous:
        response = await anonymous.put(f"/object/{storage.bucket}/{_key('a.png')}", content=b"x")

    assert response.status_code == 400
    assert response.json()["message"] == "headers must have required property 'authorization'"


async def test_signed_urls_are_relative_and_download_without_a_key(
    api: httpx.AsyncClient, storage: StoragePeer
) -> None:
    key = _key("with space (1).png")
    await api.put(f"/object/{storage.bucket}/{key}", content=b"img", headers={"Content-Type": "image/png"})

    signed = await _sign(api, storage, key)

    path, _, token = signed.partition("?token=")
    assert path == f"/object/sign/{storage.bucket}/{key}"
    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["url"] == f"{storage.bucket}/{key}"
    assert claims["exp"] - claims["iat"] == 60
    async with httpx.AsyncClient() as anonymous:
        response = await anonymous.get(f"{storage.url}/storage/v1{signed}")
    assert (response.status_code, response.content) == (200, b"img")


async def test_a_tampered_signed_url_is_refused(api: httpx.AsyncClient, storage: StoragePeer) -> None:
    key = _key("a.png")
    await api.put(f"/object/{storage.bucket}/{key}", content=b"img")
    signed = await _sign(api, storage, key)

    async with httpx.AsyncClient() as anonymous:
        response = await anonymous.get(f"{storage.url}/storage/v1{signed[:-2]}xx")

    assert response.status_code == 400
    assert response.json()["error"] == "InvalidJWT"


async def test_sign_requires_a_positive_expiry(api: httpx.AsyncClient, storage: StoragePeer) -> None:
    key = _key("a.png")
    await api.put(f"/object/{storage.bucket}/{key}", content=b"img")

    missing = await api.post(f"/object/sign/{storage.bucket}/{key}", json={})
    zero = await api.post(f"/object/sign/{storage.bucket}/{key}", json={"expiresIn": 0})

    assert missing.json()["message"] == "body must have required property 'expiresIn'"
    assert zero.json()["message"] == "body/expiresIn must be >= 1"


async def test_the_sink_deletes_an_object_and_a_missing_one_is_no_error(
    storage: StoragePeer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """How live previews are removed when their job ends."""
    monkeypatch.setenv("SUPABASE_URL", storage.url)
    monkeypatch.setenv("SUPABASE_SERVICE_KEY", storage.service_key)
    sink = SupabaseSink.from_config({"type": "supabase", "bucket": storage.bucket}, output_directory=tmp_path)
    key = _key("preview.jpg")
    source = tmp_path / "frame.jpg"
    source.write_bytes(b"\xff\xd8frame")
    try:
        await sink.put(key, source, "image/jpeg")
        await sink.delete(key)
        await sink.delete(key)  # already gone: fine
        with pytest.raises(TerminalError, match="404"):
            await sink.sign(key, 60)
    finally:
        await sink.aclose()


# --- the sink's download (input images) ----------------------------------------------------


def _sink(storage: StoragePeer) -> SupabaseSink:
    return SupabaseSink(url=storage.url, key=storage.service_key, bucket=storage.bucket, max_retries=0)


async def test_the_sink_downloads_an_object_and_refuses_missing_and_oversized_ones(
    api: httpx.AsyncClient, storage: StoragePeer
) -> None:
    key = _key("uploads/cat.png")
    data = bytes(range(256)) * 64
    stored = await api.put(
        f"/object/{storage.bucket}/{key}", content=data, headers={"Content-Type": "image/png"}
    )
    sink = _sink(storage)
    try:
        fetched = await sink.get(key, len(data))
        with pytest.raises(ObjectTooLarge):
            await sink.get(key, len(data) - 1)
        with pytest.raises(ObjectNotFound):
            await sink.get(_key("uploads/missing.png"), len(data))
    finally:
        await sink.aclose()

    assert stored.status_code == 200, stored.text
    assert fetched == data


# --- the bucket, as the worker's start-up check reads it ---------------------------------------


async def test_a_bucket_look_is_answered_for_a_present_and_a_missing_bucket(
    api: httpx.AsyncClient, storage: StoragePeer
) -> None:
    present = await api.get(f"/bucket/{storage.bucket}")
    missing = await api.get(f"/bucket/{uuid.uuid4().hex}")

    assert present.status_code == 200 and present.json()["id"] == storage.bucket
    assert missing.status_code == 400 and missing.json()["statusCode"] == "404"


# --- a Storage whose disk is full ----------------------------------------------------------------


async def test_a_full_disk_answers_uploads_500_enospc_while_the_bucket_still_answers(
    full_disk_storage: FullStorage,
) -> None:
    """Why a worker waits with its image rather than fails the job: Storage answers, but every
    upload is a 500, the transient kind its sink gives up on with ``StorageUnavailable``."""
    peer = full_disk_storage
    headers = {"Authorization": f"Bearer {peer.service_key}", "apikey": peer.service_key}
    async with httpx.AsyncClient(base_url=peer.api, headers=headers) as api:
        upload = await api.put(
            f"/object/{peer.bucket}/{_key('image.png')}", content=bytes(200_000),
            headers={"content-type": "image/png", "x-upsert": "true"},
        )  # fmt: skip
        bucket = await api.get(f"/bucket/{peer.bucket}")

    assert upload.status_code == 500
    assert upload.json() == {
        "statusCode": "500", "error": "Error", "message": "ENOSPC: no space left on device, write",
        "code": "InternalError",
    }  # fmt: skip
    assert bucket.status_code == 200
