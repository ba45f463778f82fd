"""Supabase Storage sink: streamed upserts, retries only where retrying can help.

Protocol facts this relies on (docs/supabase.md, the Storage API reference):
- every client error is HTTP 400; the real status is the *string* ``statusCode`` in the body,
  so decisions read the body, never the HTTP status alone;
- ``PUT /object/{bucket}/{key}`` is always an upsert that keeps the object's ``Id``, so a
  retried upload overwrites its own object and never creates a second one;
- ``signedURL`` answers are relative to the storage server (no ``/storage/v1``) and carry
  the raw, unencoded key.
The service key only ever lives in the environment and in request headers: it is not stored
in ``repr``, logs, exception messages or ``detail``.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self
from urllib.parse import quote, unquote

import anyio
import httpx
import structlog
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from imagen_worker.errors import ConfigError, StorageUnavailable, TerminalError, public_message
from imagen_worker.storage.base import ObjectNotFound, ObjectTooLarge, StorageSink, StoredObject
from imagen_worker.storage.keys import MissingCredentials, encode_key

log = structlog.get_logger(__name__)

DEFAULT_URL_ENV = "SUPABASE_URL"
DEFAULT_KEY_ENV = "SUPABASE_SERVICE_KEY"
FALLBACK_KEY_ENV = "MAI_SUPABASE_KEY"
DEFAULT_BUCKET = "imagen-generated"
CHUNK_SIZE = 256 * 1024

_KEYS = frozenset({"type", "url_env", "key_env", "bucket", "timeout", "max_retries", "cache_control"})
_RETRY_STATUS = frozenset({429, 544})


@dataclass(frozen=True)
class StorageApiError:
    """One error answer, decoded from the body the way the Storage server means it."""

    http_status: int
    status: str
    code: str
    message: str

    @classmethod
    def from_response(cls, response: httpx.Response) -> StorageApiError:
        status, code, message = str(response.status_code), "", ""
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict):
            status = str(body.get("statusCode") or status)
            code = str(body.get("code") or body.get("error") or "")
            message = str(body.get("message") or body.get("msg") or body.get("error") or "")
        if not message:
            # Proxies answer with HTML pages: keep their title, never the markup.
            message = public_message(response.text[:4000]) if response.text.strip() else ""
            message = message or response.reason_phrase
        return cls(http_status=response.status_code, status=status, code=code, message=message)

    @property
    def retryable(self) -> bool:
        real = int(self.status) if self.status.isdigit() else self.http_status
        return _retryable_status(self.http_status) or _retryable_status(real)

    def as_detail(self) -> dict[str, Any]:
        return {
            "http_status": self.http_status,
            "status": self.status,
            "code": self.code,
            "message": self.message,
        }


class _Transient(Exception):
    """An attempt that may succeed when repeated (transport error, 429, 5xx, 544)."""

    def __init__(self, reason: str, detail: dict[str, Any]) -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def _retryable_status(status: int) -> bool:
    return status in _RETRY_STATUS or 500 <= status <= 599


def _jwt_role(key: str) -> str | None:
    """The ``role`` claim of a legacy JWT API key (read, not verified); None for other keys."""
    if key.startswith("sb_publishable_"):
        return "anon"
    if key.startswith("sb_secret_"):
        return "service_role"
    parts = key.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):
        return None
    role = payload.get("role") if isinstance(payload, dict) else None
    return role if isinstance(role, str) else None


async def file_chunks(path: Path, chunk_size: int) -> AsyncIterator[bytes]:
    """The file in ``chunk_size`` pieces: one chunk in memory at a time, re-opened per attempt."""
    async with await anyio.open_file(path, "rb") as handle:
        while chunk := await handle.read(chunk_size):
            yield chunk


class SupabaseSink(StorageSink):
    type_name = "supabase"

    def __init__(
        self,
        *,
        url: str,
        key: str,
        bucket: str = DEFAULT_BUCKET,
        timeout: float = 60.0,
        max_retries: int = 4,
        cache_control: str | None = None,
        key_env: str = DEFAULT_KEY_ENV,
        url_env: str = DEFAULT_URL_ENV,
        backoff_initial: float = 0.5,
        backoff_max: float = 20.0,
        chunk_size: int = CHUNK_SIZE,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(
                f"storage: ${url_env} must be an http(s) URL like https://<project>.supabase.co"
            )
        if not bucket or "/" in bucket:
            raise ConfigError(f"storage.bucket: {bucket!r} is not a bucket name")
        # The project URL; one copied with the API path (``…/storage/v1``) means the same server.
        self.url = url.rstrip("/").removesuffix("/storage/v1")
        self.api = self.url + "/storage/v1"
        self.bucket = bucket
        self.timeout = timeout
        self.max_retries = max_retries
        self.cache_control = cache_control
        self.key_env = key_env
        self.url_env = url_env
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.chunk_size = chunk_size
        self._key = key
        self._transport = transport
        self._client: httpx.AsyncClient | None = None

    def __repr__(self) -> str:
        return f"SupabaseSink(url={self.url!r}, bucket={self.bucket!r})"

    @classmethod
    def from_config(cls, block: Mapping[str, Any], *, output_directory: Path) -> Self:
        """Read the block and the environment; ``MissingCredentials`` names the variables to set."""
        unknown = set(block) - _KEYS
        if unknown:
            raise ConfigError(
                f"storage: unknown key(s) {sorted(unknown)} for type supabase; use {sorted(_KEYS - {'type'})}"
            )
        url_env = _env_name(block, "url_env", DEFAULT_URL_ENV)
        key_env = _env_name(block, "key_env", DEFAULT_KEY_ENV)
        bucket = block.get("bucket", DEFAULT_BUCKET)
        if not isinstance(bucket, str) or not bucket or "/" in bucket:
            raise ConfigError(f"storage.bucket: {bucket!r} is not a bucket name")
        timeout = _number(block, "timeout", 60.0, minimum=1.0)
        max_retries = int(_number(block, "max_retries", 4, minimum=0, integer=True))
        cache_control = block.get("cache_control")
        if isinstance(cache_control, int) and not isinstance(cache_control, bool) and cache_control >= 0:
            cache_control = f"max-age={cache_control}"
        elif cache_control is not None and (not isinstance(cache_control, str) or not cache_control.strip()):
            raise ConfigError("storage.cache_control: seconds (3600) or a header value (max-age=3600)")

        url = os.environ.get(url_env, "").strip()
        key_names = [key_env] + ([FALLBACK_KEY_ENV] if key_env == DEFAULT_KEY_ENV else [])
        key = next((v for v in (os.environ.get(n, "").strip() for n in key_names) if v), "")
        missing = ([url_env] if not url else []) + ([" or ".join(key_names)] if not key else [])
        if missing:
            raise MissingCredentials(
                f"storage: Supabase credentials missing: set {' and '.join(missing)} in the environment "
                "(the service key, server side only), or run without cloud sync (--no-cloud, "
                "IMAGEN_CLOUD_SYNC=off)"
            )
        used_key_env = next(n for n in key_names if os.environ.get(n, "").strip())
        return cls(
            url=url,
            key=key,
            bucket=bucket,
            timeout=timeout,
            max_retries=max_retries,
            cache_control=cache_control,
            key_env=used_key_env,
            url_env=url_env,
        )

    @property
    def is_cloud(self) -> bool:
        return True

    # --- HTTP plumbing ---------------------------------------------------------------

    def _http(self) -> httpx.AsyncClient:
        """Created on first use, so building a sink needs neither a loop nor the network."""
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout, connect=min(10.0, self.timeout)),
                headers={"apikey": self._key, "Authorization": f"Bearer {self._key}"},
                transport=self._transport,
                follow_redirects=False,
            )
        return self._client

    @property
    def _bucket_url(self) -> str:
        return f"{self.api}/bucket/{quote(self.bucket, safe='')}"

    def _object_url(self, route: str, key: str) -> str:
        return f"{self.api}/{route}/{quote(self.bucket, safe='')}/{encode_key(key)}"

    async def _with_retries(
        self, operation: str, key: str | None, attempt_once: Callable[[], Awaitable[httpx.Response]]
    ) -> httpx.Response:
        """Run ``attempt_once`` until it answers or fails for good; transient ends → StorageUnavailable."""

        def _log_retry(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.warning(
                "storage.retry",
                operation=operation,
                key=key,
                attempt=state.attempt_number,
                reason=getattr(exc, "reason", repr(exc)),
            )

        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(self.max_retries + 1),
                wait=wait_exponential(multiplier=self.backoff_initial, max=self.backoff_max),
                retry=retry_if_exception_type(_Transient),
                before_sleep=_log_retry,
                reraise=True,
            ):
                with attempt:
                    return await attempt_once()
        except _Transient as exc:
            raise StorageUnavailable(
                f"storage {operation} failed after {self.max_retries + 1} attempt(s): {exc.reason}",
                detail={"operation": operation, "bucket": self.bucket, "key": key, **exc.detail},
            ) from None
        raise AssertionError("unreachable: tenacity either returns, reraises or retries")

    async def _send(self, request: httpx.Request) -> httpx.Response:
        """One attempt: transport errors and retryable statuses become ``_Transient``."""
        try:
            response = await self._http().send(request)
        except httpx.TransportError as exc:
            raise _Transient(
                f"{type(exc).__name__} talking to {self.url}", {"transport_error": type(exc).__name__}
            ) from None
        if response.is_success:
            return response
        error = StorageApiError.from_response(response)
        if error.retryable:
            raise _Transient(
                f"HTTP {response.status_code} ({error.code or error.status}): {error.message}",
                error.as_detail(),
            )
        return response

    # --- the sink contract -----------------------------------------------------------

    async def put(self, key: str, source: Path, mime_type: str) -> StoredObject:
        url = self._object_url("object", key)
        if not await anyio.Path(source).is_file():
            raise TerminalError(
                f"the local image {source} is missing, nothing to upload",
                detail={"operation": "upload", "bucket": self.bucket, "key": key},
            )

        async def attempt_once() -> httpx.Response:
            size = (await anyio.Path(source).stat()).st_size
            headers = {
                "Content-Type": mime_type or "application/octet-stream",
                "Content-Length": str(size),
                "x-upsert": "true",
            }
            if self.cache_control:
                headers["cache-control"] = self.cache_control
            request = self._http().build_request(
                "PUT", url, headers=headers, content=file_chunks(source, self.chunk_size)
            )
            return await self._send(request)

        response = await self._with_retries("upload", key, attempt_once)
        if not response.is_success:
            raise self._refused("upload", key, StorageApiError.from_response(response))
        stored_key = f"{self.bucket}/{key}"
        try:
            body = response.json()
            if isinstance(body, dict) and isinstance(body.get("Key"), str):
                stored_key = body["Key"]
        except ValueError:
            pass
        return StoredObject(key=key, location=stored_key)

    async def delete(self, key: str) -> None:
        url = self._object_url("object", key)

        async def attempt_once() -> httpx.Response:
            return await self._send(self._http().build_request("DELETE", url))

        response = await self._with_retries("delete", key, attempt_once)
        if response.is_success:
            return
        error = StorageApiError.from_response(response)
        if error.status == "404" or error.http_status == 404:
            return  # already gone
        raise self._refused("delete", key, error)

    async def get(self, key: str, max_bytes: int) -> bytes:
        """Stream the object with the service key; stop reading past ``max_bytes``."""
        url = self._object_url("object", key)
        body = bytearray()

        async def attempt_once() -> httpx.Response:
            body.clear()
            try:
                response = await self._http().send(self._http().build_request("GET", url), stream=True)
            except httpx.TransportError as exc:
                raise _Transient(
                    f"{type(exc).__name__} talking to {self.url}", {"transport_error": type(exc).__name__}
                ) from None
            try:
                if not response.is_success:
                    await response.aread()
                    error = StorageApiError.from_response(response)
                    if error.retryable:
                        raise _Transient(f"HTTP {response.status_code}: {error.message}", error.as_detail())
                    return response
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > max_bytes:
                    raise self._too_large(key, max_bytes)
                async for chunk in response.aiter_bytes():
                    body.extend(chunk)
                    if len(body) > max_bytes:
                        raise self._too_large(key, max_bytes)
            except httpx.TransportError as exc:
                raise _Transient(
                    f"{type(exc).__name__} reading from {self.url}", {"transport_error": type(exc).__name__}
                ) from None
            finally:
                await response.aclose()
            return response

        response = await self._with_retries("download", key, attempt_once)
        if not response.is_success:
            error = StorageApiError.from_response(response)
            if error.status == "404" or error.code in ("NoSuchKey", "not_found"):
                raise ObjectNotFound(
                    f"no object {key!r} in bucket {self.bucket!r}",
                    detail={"operation": "download", "bucket": self.bucket, "key": key},
                )
            raise self._refused("download", key, error)
        return bytes(body)

    def _too_large(self, key: str, max_bytes: int) -> ObjectTooLarge:
        return ObjectTooLarge(
            f"object {key!r} is over {max_bytes} bytes",
            detail={"operation": "download", "bucket": self.bucket, "key": key, "max_bytes": max_bytes},
        )

    async def sign(self, key: str, ttl_seconds: int) -> str:
        """A host-qualified URL anyone can GET until it expires, with its path percent-encoded."""
        if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int) or ttl_seconds < 1:
            raise ValueError("ttl_seconds must be a whole number of seconds, at least 1")
        url = self._object_url("object/sign", key)

        async def attempt_once() -> httpx.Response:
            return await self._send(self._http().build_request("POST", url, json={"expiresIn": ttl_seconds}))

        response = await self._with_retries("sign", key, attempt_once)
        if not response.is_success:
            raise self._refused("sign", key, StorageApiError.from_response(response))
        try:
            signed = response.json()["signedURL"]
        except (ValueError, KeyError, TypeError):
            signed = None
        if not isinstance(signed, str) or not signed.startswith("/"):
            raise TerminalError(
                "storage answered the sign request without a signedURL",
                detail={"operation": "sign", "bucket": self.bucket, "key": key},
            )
        return self.api + _encode_signed_path(signed)

    async def check(self) -> None:
        """Fail at startup, in one line, on an anon key, a foreign key or a missing bucket.

        An unreachable server is a ``StorageUnavailable``, not a ``ConfigError``: the worker starts
        anyway and its jobs retry their uploads once storage is back.
        """
        role = _jwt_role(self._key)
        if role in ("anon", "authenticated"):
            raise ConfigError(
                f"storage: ${self.key_env} holds the {role} key; the worker needs the service_role "
                "key (Project Settings → API), which must stay server side"
            )

        async def attempt_once() -> httpx.Response:
            return await self._send(self._http().build_request("GET", self._bucket_url))

        try:
            response = await self._with_retries("check", None, attempt_once)
        except StorageUnavailable as exc:
            why = exc.detail.get("transport_error") or exc.message
            raise StorageUnavailable(
                f"storage: cannot reach {self.url} ({why}, {self.max_retries + 1} attempt(s))",
                detail=exc.detail,
            ) from None
        if response.is_success:
            return
        error = StorageApiError.from_response(response)
        if error.code == "NoSuchBucket" or error.status == "404":
            raise ConfigError(
                f"storage: bucket {self.bucket!r} not found at {self.url} (or the key cannot see it): "
                "apply migrations/0003_supabase_storage.sql or set storage.bucket"
            )
        if error.status in ("401", "403"):
            raise ConfigError(
                f"storage: ${self.key_env} was refused by {self.url} ({error.status} {error.code}: "
                f"{error.message}); use this project's service_role key"
            )
        raise ConfigError(
            f"storage: checking bucket {self.bucket!r} failed ({error.status} {error.code}): {error.message}"
        )

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # --- errors ------------------------------------------------------------------------

    def _refused(self, operation: str, key: str, error: StorageApiError) -> TerminalError:
        verb = {"upload": "the upload", "sign": "to sign", "download": "the download"}.get(
            operation, operation
        )
        label = f"{error.status} {error.code}".strip()
        message = f"storage refused {verb} ({label}): {error.message}"
        if hint := self._hint(error):
            message += f" — {hint}"
        return TerminalError(
            message,
            detail={"operation": operation, "bucket": self.bucket, "key": key, **error.as_detail()},
        )

    def _hint(self, error: StorageApiError) -> str | None:
        text = error.message.lower()
        if error.code == "AccessDenied" and "row-level security" in text:
            return f"the worker needs the service key, not the anon key (check ${self.key_env})"
        if error.code == "AccessDenied" and "signature" in text:
            return f"${self.key_env} is not a key of the project at ${self.url_env}"
        if error.code == "NoSuchBucket":
            return (
                f"create bucket {self.bucket!r} (migrations/0003_supabase_storage.sql) or set storage.bucket"
            )
        if error.status == "401" or error.http_status == 401:
            return f"the key in ${self.key_env} was not accepted"
        if error.code in ("EntityTooLarge", "InvalidMimeType"):
            return f"check the size and MIME type limits of bucket {self.bucket!r}"
        return None


def _encode_signed_path(signed: str) -> str:
    """Percent-encode the raw key inside a ``signedURL``; the query (a JWT) is kept as is.

    The key may contain ``?`` (allowed by Storage) but the token never does, so the query
    starts at the last ``?``. Unquoting first keeps this right if a server version encodes.
    """
    path, sep, query = signed.rpartition("?")
    if not sep:
        path, query = signed, ""
    encoded = quote(unquote(path), safe="/")
    return f"{encoded}?{query}" if sep else encoded


def _env_name(block: Mapping[str, Any], name: str, default: str) -> str:
    value = block.get(name, default)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"storage.{name}: the name of an environment variable, like {default}")
    return value.strip()


def _number(
    block: Mapping[str, Any], name: str, default: float, *, minimum: float, integer: bool = False
) -> float:
    value = block.get(name, default)
    ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok_type or value < minimum:
        kind = "a whole number" if integer else "a number"
        raise ConfigError(f"storage.{name}: {kind} ≥ {minimum:g}, got {value!r}")
    return float(value)
