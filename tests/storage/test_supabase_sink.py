"""SupabaseSink against the fake Storage API: uploads, retries, errors, signing, key safety."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
import httpx
import pytest

from imagen_worker.errors import ConfigError, JobError, RetryableError, TerminalError
from imagen_worker.storage import InvalidStorageKey, MissingCredentials, StoredObject
from imagen_worker.storage import supabase as supabase_module
from imagen_worker.storage.supabase import SupabaseSink
from tests.fakes.storage import FakeStorage

KEY = "2026-05-11/test-42-1a2b3c4d.png"
IMAGE_BYTES = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40
Make = Callable[..., SupabaseSink]


@pytest.fixture
def image_file(tmp_path: Path) -> Path:
    path = tmp_path / "render.png"
    path.write_bytes(IMAGE_BYTES)
    return path


@pytest.fixture
def big_file(tmp_path: Path) -> tuple[Path, bytes]:
    data = bytes(range(256)) * (4 * 1024 * 1024 // 256)  # 4 MiB
    path = tmp_path / "big.png"
    path.write_bytes(data)
    return path, data


def _uploads(fake: FakeStorage) -> list[str]:
    return [r.raw_path for r in fake.requests if r.method == "PUT"]


# --- upload ------------------------------------------------------------------------------


async def test_put_streams_the_file_with_service_key_headers_and_lowercase_upsert(
    fake_storage: FakeStorage, make_sink: Make, image_file: Path
) -> None:
    stored = await make_sink().put(KEY, image_file, "image/png")

    assert stored == StoredObject(key=KEY, location=f"imagen-generated/{KEY}")
    blob = fake_storage.get(KEY)
    assert blob is not None
    assert blob.data == IMAGE_BYTES
    assert blob.content_type == "image/png"
    (request,) = fake_storage.requests
    assert request.method == "PUT"
    assert request.raw_path == f"/storage/v1/object/imagen-generated/{KEY}"
    assert request.headers["x-upsert"] == "true"
    assert request.headers["apikey"] == fake_storage.service_key
    assert request.headers["authorization"] == f"Bearer {fake_storage.service_key}"
    assert request.headers["content-type"] == "image/png"
    assert request.headers["content-length"] == str(len(IMAGE_BYTES))
    assert "transfer-encoding" not in request.headers


async def test_a_url_copied_with_the_api_path_reaches_the_same_server(
    fake_storage: FakeStorage, make_sink: Make, image_file: Path
) -> None:
    await make_sink(url=fake_storage.url + "/storage/v1/").put(KEY, image_file, "image/png")

    (request,) = fake_storage.requests
    assert request.raw_path == f"/storage/v1/object/imagen-generated/{KEY}"
    assert fake_storage.get(KEY) is not None


@pytest.mark.parametrize("failure", [500, 503, 429, 544, "drop"])
async def test_put_retries_transient_failures_then_succeeds_with_one_object(
    fake_storage: FakeStorage, make_sink: Make, image_file: Path, failure: int | str
) -> None:
    fake_storage.fail_next(2, status=failure)  # type: ignore[arg-type]

    await make_sink(max_retries=3).put(KEY, image_file, "image/png")

    assert len(_uploads(fake_storage)) == 3
    assert fake_storage.object_count() == 1
    blob = fake_storage.get(KEY)
    assert blob is not None and blob.data == IMAGE_BYTES  # the stream was re-opened


async def test_put_gives_up_after_max_retries_with_a_retryable_error_keeping_the_status(
    fake_storage: FakeStorage, make_sink: Make, image_file: Path
) -> None:
    fake_storage.fail_next(10, status=503)

    with pytest.raises(RetryableError) as caught:
        await make_sink(max_retries=2).put(KEY, image_file, "image/png")

    assert len(_uploads(fake_storage)) == 3
    assert "after 3 attempt(s)" in caught.value.message
    assert caught.value.detail["status"] == "503"
    assert caught.value.detail["key"] == KEY
    assert fake_storage.object_count() == 0


async def test_put_does_not_retry_a_client_error_and_names_the_servers_code(
    fake_storage: FakeStorage, make_sink: Make, image_file: Path
) -> None:
    with pytest.raises(TerminalError) as caught:
        await make_sink(bucket="no-such-bucket").put(KEY, image_file, "image/png")

    assert len(fake_storage.requests) == 1
    assert caught.value.message.startswith("storage refused the upload (404 NoSuchBucket): Bucket not found")
    assert caught.value.detail == {
        "operation": "upload",
        "bucket": "no-such-bucket",
        "key": KEY,
        "http_status": 400,
        "status": "404",
        "code": "NoSuchBucket",
        "message": "Bucket not found",
    }


async def test_anon_key_upload_is_refused_once_with_a_configuration_hint(
    fake_storage: FakeStorage, make_sink: Make, image_file: Path
) -> None:
    with pytest.raises(TerminalError) as caught:
        await make_sink(key=fake_storage.anon_key).put(KEY, image_file, "image/png")

    assert caught.value.message == (
        "storage refused the upload (403 AccessDenied): new row violates row-level security policy"
        " — the worker needs the service key, not the anon key (check $SUPABASE_SERVICE_KEY)"
    )
    assert not caught.value.retryable
    assert len(fake_storage.requests) == 1
    assert fake_storage.object_count() == 0


async def test_a_key_from_another_project_is_refused_with_signature_verification_failed(
    fake_storage: FakeStorage, make_sink: Make, image_file: Path
) -> None:
    with pytest.raises(TerminalError) as caught:
        await make_sink(key=fake_storage.foreign_key).put(KEY, image_file, "image/png")

    assert "(403 AccessDenied): signature verification failed" in caught.value.message
    assert "$SUPABASE_SERVICE_KEY is not a key of the project at $SUPABASE_URL" in caught.value.message


async def test_uploading_the_same_key_twice_keeps_one_object_with_the_same_id(
    fake_storage: FakeStorage, make_sink: Make, image_file: Path, tmp_path: Path
) -> None:
    sink = make_sink()
    await sink.put(KEY, image_file, "image/png")
    first = fake_storage.get(KEY)
    second_file = tmp_path / "second.png"
    await anyio.Path(second_file).write_bytes(b"second render")

    await sink.put(KEY, second_file, "image/png")

    assert fake_storage.object_count() == 1
    assert fake_storage.put_count(KEY) == 2
    blob = fake_storage.get(KEY)
    assert first is not None and blob is not None
    assert blob.id == first.id
    assert blob.data == b"second render"


async def test_a_lost_answer_after_the_upload_landed_is_retried_into_the_same_object(
    fake_storage: FakeStorage, make_sink: Make, image_file: Path
) -> None:
    fake_storage.fail_next(1, status="drop_after", methods=["PUT"])

    await make_sink().put(KEY, image_file, "image/png")

    assert fake_storage.put_count(KEY) == 2
    assert fake_storage.object_count() == 1


async def test_put_reads_the_file_in_chunks_and_reopens_it_for_each_attempt(
    fake_storage: FakeStorage, make_sink: Make, big_file: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    big, data = big_file
    chunk = 64 * 1024
    opened: list[list[int]] = []
    real_chunks = supabase_module.file_chunks

    async def counting_chunks(path: Path, chunk_size: int) -> AsyncIterator[bytes]:
        sizes: list[int] = []
        opened.append(sizes)
        async for piece in real_chunks(path, chunk_size):
            sizes.append(len(piece))
            yield piece

    monkeypatch.setattr(supabase_module, "file_chunks", counting_chunks)
    fake_storage.fail_next(1, status="drop", methods=["PUT"])

    await make_sink(chunk_size=chunk).put(KEY, big, "image/png")

    assert len(opened) == 2  # one fresh stream per attempt
    assert [len(sizes) for sizes in opened] == [64, 64]
    assert max(max(sizes) for sizes in opened) == chunk
    blob = fake_storage.get(KEY)
    assert blob is not None and blob.data == data
    assert fake_storage.requests[-1].headers["content-length"] == str(4 * 1024 * 1024)


async def test_a_missing_local_file_is_terminal_and_sends_nothing(
    fake_storage: FakeStorage, make_sink: Make, tmp_path: Path
) -> None:
    with pytest.raises(TerminalError, match="missing"):
        await make_sink().put(KEY, tmp_path / "gone.png", "image/png")

    assert fake_storage.requests == []


async def test_an_unreachable_server_is_retryable(make_sink: Make, image_file: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sink = make_sink(url=f"http://127.0.0.1:{port}", max_retries=1)

    with pytest.raises(RetryableError) as caught:
        await sink.put(KEY, image_file, "image/png")

    assert caught.value.detail["transport_error"] == "ConnectError"


async def test_the_service_key_never_appears_in_errors_or_repr(
    fake_storage: FakeStorage, make_sink: Make, image_file: Path
) -> None:
    sink = make_sink(bucket="no-such-bucket")
    fake_storage.fail_next(10, status=500)
    errors: list[JobError] = []
    for attempt_sink in (sink, make_sink(key=fake_storage.anon_key)):
        with pytest.raises((TerminalError, RetryableError)) as caught:
            await attempt_sink.put(KEY, image_file, "image/png")
        errors.append(caught.value)

    for key, error in zip((fake_storage.service_key, fake_storage.anon_key), errors, strict=True):
        for text in (str(error), error.message, json.dumps(error.detail), repr(sink)):
            assert key not in text
            assert key.split(".")[2] not in text


# --- keys --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "2026-05-11/ünïcødé-画像.png",
        "2026-05-11/../escape.png",
        "2026-05-11/./here.png",
        "../escape.png",
        "/2026-05-11/absolute.png",
        "2026-05-11//double.png",
        "2026-05-11/",
        "",
        "2026-05-11/" + "x" * 300 + ".png",
        "2026-05-11/hash#tag.png",
        "2026-05-11/pre%2Fencoded.png",
        "2026-05-11\\back.png",
        "2026-05-11/tab\t.png",
    ],
)
async def test_unsafe_keys_are_refused_before_any_request(
    fake_storage: FakeStorage, make_sink: Make, image_file: Path, key: str
) -> None:
    sink = make_sink()

    with pytest.raises(InvalidStorageKey) as caught:
        await sink.put(key, image_file, "image/png")
    with pytest.raises(ValueError):
        await sink.sign(key, 60)

    assert isinstance(caught.value, TerminalError)
    assert caught.value.detail["key"] == key
    assert fake_storage.requests == []


@pytest.mark.parametrize(
    "key",
    ["2026-05-11/a..b.png", "2026-05-11/with space (1).png", "2026-05-11/deep/er/k+e=y@x.png"],
)
async def test_odd_but_valid_keys_are_stored_exactly_where_asked(
    fake_storage: FakeStorage, make_sink: Make, image_file: Path, key: str
) -> None:
    stored = await make_sink().put(key, image_file, "image/png")

    assert stored.location == f"imagen-generated/{key}"
    assert list(fake_storage.objects) == [("imagen-generated", key)]


# --- signed URLs -------------------------------------------------------------------------


async def test_signed_url_is_host_qualified_and_serves_the_same_bytes_without_auth(
    fake_storage: FakeStorage, make_sink: Make, image_file: Path
) -> None:
    sink = make_sink()
    await sink.put(KEY, image_file, "image/png")

    url = await sink.sign(KEY, 60)

    assert url.startswith(f"{fake_storage.url}/storage/v1/object/sign/imagen-generated/{KEY}?token=")
    sign_request = fake_storage.requests[-1]
    assert sign_request.method == "POST"
    assert sign_request.raw_path == f"/storage/v1/object/sign/imagen-generated/{KEY}"
    async with httpx.AsyncClient() as anonymous:
        response = await anonymous.get(url)
    assert response.status_code == 200
    assert response.content == IMAGE_BYTES
    assert response.headers["content-type"] == "image/png"
    assert "authorization" not in fake_storage.requests[-1].headers


async def test_signed_url_percent_encodes_a_key_with_spaces(
    fake_storage: FakeStorage, make_sink: Make, image_file: Path
) -> None:
    key = "2026-05-11/with space (1).png"
    sink = make_sink()
    await sink.put(key, image_file, "image/png")

    url = await sink.sign(key, 60)

    assert " " not in url
    assert "/2026-05-11/with%20space%20%281%29.png?token=" in url
    async with httpx.AsyncClient() as anonymous:
        response = await anonymous.get(url)
    assert response.content == IMAGE_BYTES


async def test_an_expired_or_tampered_signed_url_is_refused(
    fake_storage: FakeStorage, make_sink: Make, image_file: Path
) -> None:
    sink = make_sink()
    await sink.put(KEY, image_file, "image/png")
    url = await sink.sign(KEY, 1)
    head, _, token = url.partition("?token=")
    tampered = f"{head}?token={token[:-2]}{'AA' if not token.endswith('AA') else 'BB'}"

    fake_storage.advance_clock(5)
    async with httpx.AsyncClient() as anonymous:
        expired = await anonymous.get(url)
        forged = await anonymous.get(tampered)

    assert expired.status_code == 400
    assert expired.json()["code"] == "InvalidJWT"
    assert expired.json()["message"] == '"exp" claim timestamp check failed'
    assert forged.json()["message"] == "signature verification failed"


async def test_signing_a_missing_object_is_a_terminal_no_such_key(
    fake_storage: FakeStorage, make_sink: Make
) -> None:
    with pytest.raises(TerminalError) as caught:
        await make_sink().sign(KEY, 60)

    assert caught.value.message.startswith("storage refused to sign (404 NoSuchKey): Object not found")
    assert len(fake_storage.requests) == 1


@pytest.mark.parametrize("ttl", [0, -5, 1.5, True])
async def test_sign_refuses_a_ttl_the_server_would_refuse(
    fake_storage: FakeStorage, make_sink: Make, ttl: object
) -> None:
    with pytest.raises(ValueError, match="ttl_seconds"):
        await make_sink().sign(KEY, ttl)  # type: ignore[arg-type]

    assert fake_storage.requests == []


# --- check -------------------------------------------------------------------------------


async def test_check_passes_with_the_service_key_and_an_existing_bucket(
    fake_storage: FakeStorage, make_sink: Make
) -> None:
    await make_sink().check()

    assert fake_storage.requests[-1].raw_path == "/storage/v1/bucket/imagen-generated"


async def test_check_refuses_the_anon_key_without_asking_the_server(
    fake_storage: FakeStorage, make_sink: Make
) -> None:
    with pytest.raises(ConfigError, match=r"holds the anon key; the worker needs the service_role key"):
        await make_sink(key=fake_storage.anon_key).check()

    assert fake_storage.requests == []


async def test_check_names_a_foreign_key_and_a_missing_bucket(
    fake_storage: FakeStorage, make_sink: Make
) -> None:
    with pytest.raises(ConfigError, match=r"was refused .* signature verification failed"):
        await make_sink(key=fake_storage.foreign_key).check()
    with pytest.raises(ConfigError, match=r"bucket 'missing' not found"):
        await make_sink(bucket="missing").check()


async def test_check_reports_an_unreachable_server_as_retryable_not_misconfigured(make_sink: Make) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    with pytest.raises(RetryableError) as caught:
        await make_sink(url=f"http://127.0.0.1:{port}", max_retries=0).check()
    said = f"storage: cannot reach http://127.0.0.1:{port} (ConnectError, 1 attempt(s))"
    assert caught.value.message == said, "one sentence: where, why, how often"


# --- configuration -----------------------------------------------------------------------


def test_from_config_reads_url_and_service_key_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SUPABASE_URL", "https://abc.supabase.co/")
    monkeypatch.setenv("SUPABASE_SERVICE_KEY", "service-secret")

    sink = SupabaseSink.from_config(
        {"type": "supabase", "bucket": "pics", "timeout": 5, "max_retries": 0, "cache_control": 3600},
        output_directory=tmp_path,
    )

    assert (sink.url, sink.api, sink.bucket) == (
        "https://abc.supabase.co",
        "https://abc.supabase.co/storage/v1",
        "pics",
    )
    assert (sink.timeout, sink.max_retries, sink.cache_control) == (5.0, 0, "max-age=3600")
    assert sink.is_cloud
    assert "service-secret" not in repr(sink)


def test_the_mai_key_is_a_fallback_only_for_the_default_key_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SUPABASE_URL", "https://abc.supabase.co")
    monkeypatch.setenv("MAI_SUPABASE_KEY", "mai-secret")

    for block in ({"type": "supabase"}, {"type": "supabase", "key_env": "SUPABASE_SERVICE_KEY"}):
        sink = SupabaseSink.from_config(block, output_directory=tmp_path)
        assert sink.key_env == "MAI_SUPABASE_KEY"
    with pytest.raises(MissingCredentials, match=r"set MY_KEY in the environment"):
        SupabaseSink.from_config({"type": "supabase", "key_env": "MY_KEY"}, output_directory=tmp_path)


def test_missing_credentials_name_every_variable_to_set(tmp_path: Path) -> None:
    with pytest.raises(MissingCredentials) as caught:
        SupabaseSink.from_config({"type": "supabase"}, output_directory=tmp_path)

    assert "set SUPABASE_URL and SUPABASE_SERVICE_KEY or MAI_SUPABASE_KEY" in str(caught.value)


@pytest.mark.parametrize(
    ("block", "fragment"),
    [
        ({"type": "supabase", "service_key": "x"}, "unknown key(s) ['service_key']"),
        ({"type": "supabase", "bucket": "a/b"}, "storage.bucket"),
        ({"type": "supabase", "max_retries": -1}, "storage.max_retries"),
        ({"type": "supabase", "timeout": "soon"}, "storage.timeout"),
        ({"type": "supabase", "url_env": ""}, "storage.url_env"),
    ],
)
def test_from_config_refuses_bad_blocks(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, block: dict[str, object], fragment: str
) -> None:
    monkeypatch.setenv("SUPABASE_URL", "https://abc.supabase.co")
    monkeypatch.setenv("SUPABASE_SERVICE_KEY", "service-secret")

    with pytest.raises(ConfigError) as caught:
        SupabaseSink.from_config(block, output_directory=tmp_path)

    assert fragment in str(caught.value)
    assert not isinstance(caught.value, MissingCredentials)


async def test_cache_control_is_sent_and_stored(
    fake_storage: FakeStorage, make_sink: Make, image_file: Path
) -> None:
    await make_sink(cache_control="max-age=600").put(KEY, image_file, "image/png")

    blob = fake_storage.get(KEY)
    assert blob is not None and blob.cache_control == "max-age=600"
