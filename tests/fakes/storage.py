"""A fake Supabase Storage API that answers the way the real server does.

Behaviour follows what supabase/storage 1.11.2 was observed to do, not what a client might
hope for:

- every client error is HTTP 400 whose JSON body carries the real status as a *string*
  ``statusCode`` plus ``error``, ``code`` and ``message``; server errors are HTTP 500;
- ``PUT /object/{bucket}/{key}`` is always an upsert that keeps the object's ``Id``;
  ``POST`` creates, and answers ``"409"`` ``KeyAlreadyExists`` on an existing key unless
  ``x-upsert`` is exactly the lowercase string ``true``;
- keys are routed from the raw request path (percent-decoded once, ``%2F`` becomes a folder
  separator), validated with the server's character set and refused with ``InvalidKey`` when
  non-ASCII or when they contain a dot segment;
- the Bearer JWT decides the role: ``service_role`` bypasses RLS, ``anon`` and
  ``authenticated`` are refused writes ("new row violates row-level security policy") and see
  no private bucket; a JWT signed with another secret → ``signature verification failed``;
- signed URLs are relative, lack ``/storage/v1``, contain the raw key, and carry an HS256 JWT
  (``url``, ``scope``, ``iat``, ``exp``) signed with the fake's secret; the unauthenticated GET
  returns the stored bytes, and ``InvalidJWT`` after expiry or tampering.

It listens on 127.0.0.1 with an ephemeral port and is mounted under ``/storage/v1`` like the
hosted gateway (requests without the prefix get the gateway's 404). Use it as
``SUPABASE_URL=fake.url``.

Knobs: ``fail_next(n, status=503|"drop"|"drop_after", methods=...)``, ``upload_latency``,
``delete_latency``,
``advance_clock(seconds)``. Counters: ``objects``, ``object_count()``, ``puts`` /
``uploads`` per ``"bucket/key"``, ``requests`` (every request, with headers and body size),
``errors`` (exceptions raised inside the fake itself; assert it stays empty).
Unobserved details (marked "not observed" in the reference) are chosen to be plausible and
are documented where they are made.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import time
import uuid
from collections import Counter, deque
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any, Literal
from urllib.parse import parse_qs, unquote

from aiohttp import web

PREFIX = "/storage/v1"
DEFAULT_BUCKET = "imagen-generated"
FAKE_JWT_SECRET = "fake-storage-jwt-secret-0123456789abcdef"
VALID_KEY = re.compile(r"^[A-Za-z0-9_/!.*'() &$=@;:+,?-]*$")

FailureMode = int | Literal["drop", "drop_after", "proxy_502", "disk_full"]
# What nginx in front of Storage answers when Storage itself is down: an HTML page, not JSON.
PROXY_502 = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx/1.25.3</center>\r\n</body>\r\n</html>\r\n"
)


# --- JWT (HS256 only, standard library) ---------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def make_jwt(payload: Mapping[str, Any], secret: str, header: Mapping[str, Any] | None = None) -> str:
    """An HS256 JWT; ``header`` defaults to the legacy API keys' ``{"alg": "HS256", "typ": "JWT"}``."""
    head = _b64url(json.dumps(header or {"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    body = _b64url(json.dumps(dict(payload), separators=(",", ":")).encode())
    signature = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64url(signature)}"


class JwtError(Exception):
    pass


def verify_jwt(token: str, secret: str) -> dict[str, Any]:
    """The payload of a token signed with ``secret``; ``JwtError`` with the server's wording."""
    parts = token.split(".")
    if len(parts) != 3:
        raise JwtError("jwt malformed")  # not observed; the real server's wording may differ
    expected = hmac.new(secret.encode(), f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256).digest()
    try:
        given = _b64url_decode(parts[2])
        payload = json.loads(_b64url_decode(parts[1]))
    except ValueError:
        raise JwtError("jwt malformed") from None
    if not hmac.compare_digest(expected, given):
        raise JwtError("signature verification failed")
    if not isinstance(payload, dict):
        raise JwtError("jwt malformed")
    return payload


# --- records -----------------------------------------------------------------------------


@dataclass
class StoredBlob:
    id: str
    bucket: str
    key: str
    data: bytes
    content_type: str
    cache_control: str
    version: str
    created_at: datetime
    updated_at: datetime

    @property
    def etag(self) -> str:
        return f'"{hashlib.md5(self.data).hexdigest()}"'


@dataclass
class RecordedRequest:
    method: str
    raw_path: str  # as received, including the query string
    headers: dict[str, str]  # lower-case names
    body_size: int = 0
    status: int | None = None  # None when the connection was dropped


@dataclass
class _Failure:
    mode: FailureMode
    methods: frozenset[str] | None


@dataclass
class _Bucket:
    id: str
    public: bool = False
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))


class _Drop(Exception):
    """Abort the connection instead of answering."""


class ApiError(Exception):
    """One Storage API error answer: HTTP 400 (or the real status for 5xx) + string statusCode."""

    def __init__(self, status: str, error: str, code: str, message: str, http_status: int = 400) -> None:
        super().__init__(message)
        self.status, self.error, self.code, self.message = status, error, code, message
        self.http_status = http_status

    def response(self) -> web.Response:
        body = {"statusCode": self.status, "error": self.error, "message": self.message, "code": self.code}
        return web.json_response(body, status=self.http_status)


def _no_bucket() -> ApiError:
    return ApiError("404", "Bucket not found", "NoSuchBucket", "Bucket not found")


def _no_key() -> ApiError:
    return ApiError("404", "not_found", "NoSuchKey", "Object not found")


def _rls() -> ApiError:
    return ApiError("403", "Unauthorized", "AccessDenied", "new row violates row-level security policy")


def _invalid_request(message: str) -> ApiError:
    return ApiError("400", "Error", "InvalidRequest", message)


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- the server --------------------------------------------------------------------------


class FakeStorage:
    """An in-process Storage API on 127.0.0.1; ``async with FakeStorage() as fake: ...``."""

    def __init__(
        self,
        *,
        jwt_secret: str = FAKE_JWT_SECRET,
        buckets: Collection[str] = (DEFAULT_BUCKET,),
    ) -> None:
        self.jwt_secret = jwt_secret
        now = int(time.time())
        ten_years = now + 10 * 365 * 86400
        self.service_key = make_jwt(
            {"iss": "supabase-fake", "role": "service_role", "iat": now, "exp": ten_years}, jwt_secret
        )
        self.anon_key = make_jwt(
            {"iss": "supabase-fake", "role": "anon", "iat": now, "exp": ten_years}, jwt_secret
        )
        self.foreign_key = make_jwt(
            {"iss": "supabase-fake", "role": "service_role", "iat": now, "exp": ten_years},
            "a-different-project-secret-0123456789",
        )
        self.buckets: dict[str, _Bucket] = {name: _Bucket(name) for name in buckets}
        self.objects: dict[tuple[str, str], StoredBlob] = {}
        self.requests: list[RecordedRequest] = []
        self.errors: list[Exception] = []  # unexpected exceptions inside the fake (should stay empty)
        self.puts: Counter[str] = Counter()  # "bucket/key" → PUTs that stored
        self.uploads: Counter[str] = Counter()  # "bucket/key" → PUTs and POSTs that stored
        self.upload_latency = 0.0
        self.delete_latency = 0.0  # seconds before a delete is carried out and answered
        self.clock_offset = 0.0
        self._failures: deque[_Failure] = deque()
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    # --- lifecycle ---

    async def start(self) -> FakeStorage:
        app = web.Application(client_max_size=1 << 31)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self._port or 0)
        await site.start()
        self._port = int(self._runner.addresses[0][1])
        return self

    async def go_down(self) -> None:
        """An outage: the server stops listening (connections are refused); objects are kept."""
        await self.close()

    async def come_back(self) -> None:
        """The end of ``go_down``: listening again on the same port, with the same objects."""
        await self.start()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeStorage:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def url(self) -> str:
        """What ``SUPABASE_URL`` would be: scheme and host, without ``/storage/v1``."""
        if self._port is None:
            raise RuntimeError("FakeStorage is not started")
        return f"http://127.0.0.1:{self._port}"

    # --- knobs and counters ---

    def fail_next(
        self, n: int = 1, *, status: FailureMode = 503, methods: Collection[str] | None = None
    ) -> None:
        """The next ``n`` matching requests fail: an HTTP status (500, 503, 429, 544...), ``"drop"``
        (body read, connection closed, nothing stored), ``"drop_after"`` (the request is fully
        processed, e.g. the object stored, then the connection is closed: the answer is lost) or
        ``"proxy_502"`` (a reverse proxy's HTML error page, status 502) or ``"disk_full"`` (what a
        real Storage 1.11.2 with the file backend answers when its disk is full: 500, ENOSPC)."""
        allowed = frozenset(m.upper() for m in methods) if methods else None
        self._failures.extend(_Failure(status, allowed) for _ in range(n))

    def recover(self) -> None:
        """The outage is over: failures still queued by ``fail_next`` are dropped."""
        self._failures.clear()

    def advance_clock(self, seconds: float) -> None:
        """Move the fake's clock forward (signed-URL expiry) without sleeping."""
        self.clock_offset += seconds

    def now(self) -> int:
        return int(time.time() + self.clock_offset)

    def object_count(self, bucket: str | None = None) -> int:
        return sum(1 for b, _ in self.objects if bucket is None or b == bucket)

    def get(self, key: str, bucket: str = DEFAULT_BUCKET) -> StoredBlob | None:
        return self.objects.get((bucket, key))

    def put_count(self, key: str, bucket: str = DEFAULT_BUCKET) -> int:
        return self.puts[f"{bucket}/{key}"]

    def create_bucket(self, name: str, *, public: bool = False) -> None:
        self.buckets[name] = _Bucket(name, public=public)

    def user_key(self, user_id: str) -> str:
        """A signed-in user's access token (role ``authenticated``)."""
        now = self.now()
        payload = {"sub": user_id, "role": "authenticated", "iat": now, "exp": now + 3600}
        return make_jwt(payload, self.jwt_secret)

    # --- dispatch ---

    def _take_failure(self, method: str) -> _Failure | None:
        if self._failures and (self._failures[0].methods is None or method in self._failures[0].methods):
            return self._failures.popleft()
        return None

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        raw_path, _, raw_query = request.raw_path.partition("?")
        body = await request.read()
        record = RecordedRequest(
            method=request.method,
            raw_path=request.raw_path,
            headers={k.lower(): v for k, v in request.headers.items()},
            body_size=len(body),
        )
        self.requests.append(record)
        if not (raw_path == PREFIX or raw_path.startswith(PREFIX + "/")):
            record.status = 404
            return web.json_response({"message": "no Route matched with those values"}, status=404)
        failure = self._take_failure(request.method)
        if failure is not None and failure.mode == "drop":
            return self._drop(request)
        if failure is not None and failure.mode == "proxy_502":
            record.status = 502
            return web.Response(status=502, text=PROXY_502, content_type="text/html")
        if failure is not None and failure.mode == "disk_full":
            record.status = 500
            return ApiError(
                "500", "Error", "InternalError", "ENOSPC: no space left on device, write", 500
            ).response()
        if isinstance(failure, _Failure) and isinstance(failure.mode, int):
            record.status = failure.mode
            return ApiError(
                str(failure.mode), "Internal Server Error", "InternalError", "fake failure", failure.mode
            ).response()
        route = raw_path[len(PREFIX) :] or "/"
        query = parse_qs(raw_query)
        try:
            response = await self._route(request, route, query, body)
        except ApiError as exc:
            response = exc.response()
        except Exception as exc:  # a bug in a test or the fake: answer 500, keep it for asserts
            self.errors.append(exc)
            response = ApiError("500", "Internal", "InternalError", repr(exc), 500).response()
        if failure is not None and failure.mode == "drop_after":
            return self._drop(request)
        record.status = response.status
        return response

    def _drop(self, request: web.Request) -> web.StreamResponse:
        if request.transport is not None:
            request.transport.abort()
        return web.Response(status=500)

    async def _route(
        self, request: web.Request, route: str, query: dict[str, list[str]], body: bytes
    ) -> web.StreamResponse:
        method = request.method
        if route == "/status" and method in ("GET", "HEAD"):
            return web.Response(status=200)
        if route == "/version" and method == "GET":
            return web.Response(text="1.11.2-fake")
        if route == "/bucket" and method == "POST":
            return self._create_bucket(request, body)
        if route.startswith("/bucket/") and method == "GET":
            return self._get_bucket(request, unquote(route.removeprefix("/bucket/")))
        if route.startswith("/object/sign/"):
            rest = route.removeprefix("/object/sign/")
            if method == "POST":
                return self._sign(request, rest, body)
            if method == "GET":
                return self._signed_download(request, rest, query)
        if route.startswith("/object/public/") and method in ("GET", "HEAD"):
            bucket, key = self._split(route.removeprefix("/object/public/"))
            if bucket not in self.buckets or not self.buckets[bucket].public:
                raise _no_bucket()
            return self._serve(self._object(bucket, key), head=method == "HEAD")
        if route.startswith("/object/authenticated/") and method in ("GET", "HEAD"):
            return self._download(request, route.removeprefix("/object/authenticated/"))
        if route.startswith("/object/"):
            rest = route.removeprefix("/object/")
            if method in ("PUT", "POST"):
                return await self._upload(request, rest, body)
            if method in ("GET", "HEAD"):
                return self._download(request, rest)
            if method == "DELETE":
                return await self._delete(request, rest)
        # Fastify's own 404 for unknown routes (a real HTTP 404, integer statusCode).
        return web.json_response(
            {"message": f"Route {method}:{route} not found", "error": "Not Found", "statusCode": 404},
            status=404,
        )

    # --- auth and keys ---

    def _role(self, request: web.Request) -> str:
        header = request.headers.get("Authorization")
        if not header:
            raise _invalid_request("headers must have required property 'authorization'")
        token = header.removeprefix("Bearer ").strip()
        try:
            payload = verify_jwt(token, self.jwt_secret)
        except JwtError as exc:
            raise ApiError("403", "Unauthorized", "AccessDenied", str(exc)) from None
        exp = payload.get("exp")
        if isinstance(exp, int | float) and exp < self.now():
            raise ApiError("403", "Unauthorized", "AccessDenied", '"exp" claim timestamp check failed')
        return str(payload.get("role") or "anon")

    def _split(self, rest: str) -> tuple[str, str]:
        """``{bucket}/{key}`` from the raw path; the key is decoded once and validated."""
        raw_bucket, _, raw_key = rest.partition("/")
        bucket = unquote(raw_bucket)
        key = unquote(raw_key, errors="strict")
        if not key or not VALID_KEY.match(key):
            raise ApiError("400", "InvalidKey", "InvalidKey", f"Invalid key: {key}")
        return bucket, key

    def _check_dot_segments(self, bucket: str, key: str, version: str) -> None:
        """The file backend's path guard (the key validator itself allows dots)."""
        if any(segment in (".", "..") for segment in key.split("/")):
            raise ApiError(
                "400",
                "InvalidKey",
                "InvalidKey",
                f"Invalid key: fake-tenant/{bucket}/{key}/{version} contains dot path segment",
            )

    def _object(self, bucket: str, key: str) -> StoredBlob:
        blob = self.objects.get((bucket, key))
        if blob is None:
            raise _no_key()
        return blob

    # --- handlers ---

    def _create_bucket(self, request: web.Request, body: bytes) -> web.Response:
        if self._role(request) != "service_role":
            raise _rls()
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            raise _invalid_request("body must be object") from None
        name = data.get("id") or data.get("name")
        if not isinstance(name, str) or not name:
            raise _invalid_request("body must have required property 'name'")
        if name in self.buckets:
            raise ApiError("409", "Duplicate", "BucketAlreadyExists", "The resource already exists")
        self.create_bucket(name, public=bool(data.get("public", False)))
        return web.json_response({"name": name})

    def _get_bucket(self, request: web.Request, name: str) -> web.Response:
        role = self._role(request)
        bucket = self.buckets.get(name)
        if bucket is None or (role != "service_role" and not bucket.public):
            raise _no_bucket()
        stamp = _iso(bucket.created_at)
        return web.json_response(
            {
                "id": bucket.id,
                "name": bucket.id,
                "owner": "",
                "public": bucket.public,
                "file_size_limit": None,
                "allowed_mime_types": None,
                "created_at": stamp,
                "updated_at": stamp,
            }
        )

    async def _upload(self, request: web.Request, rest: str, body: bytes) -> web.Response:
        role = self._role(request)
        bucket, key = self._split(rest)
        if bucket not in self.buckets:
            raise _no_bucket()
        existing = self.objects.get((bucket, key))
        version = str(uuid.uuid4())
        self._check_dot_segments(bucket, key, version)
        if role != "service_role":
            raise _rls()
        # PUT always upserts (the route sets upsert); POST only with x-upsert exactly "true".
        upsert = request.method == "PUT" or request.headers.get("x-upsert") == "true"
        if existing is not None and not upsert:
            raise ApiError("409", "Duplicate", "KeyAlreadyExists", "The resource already exists")
        if self.upload_latency:
            await asyncio.sleep(self.upload_latency)
        now = datetime.now(UTC)
        blob = StoredBlob(
            id=existing.id if existing else str(uuid.uuid4()),
            bucket=bucket,
            key=key,
            data=body,
            content_type=request.headers.get("Content-Type") or "application/octet-stream",
            cache_control=request.headers.get("cache-control") or "no-cache",
            version=version,
            created_at=existing.created_at if existing else now,
            updated_at=now,
        )
        self.objects[(bucket, key)] = blob
        self.uploads[f"{bucket}/{key}"] += 1
        if request.method == "PUT":
            self.puts[f"{bucket}/{key}"] += 1
        return web.json_response({"Key": f"{bucket}/{key}", "Id": blob.id})

    def _download(self, request: web.Request, rest: str) -> web.Response:
        bucket, key = self._split(rest)
        role = self._role(request) if request.headers.get("Authorization") else "anon"
        known = self.buckets.get(bucket)
        if known is None or (role != "service_role" and not known.public):
            raise _no_bucket()
        return self._serve(self._object(bucket, key), head=request.method == "HEAD")

    async def _delete(self, request: web.Request, rest: str) -> web.Response:
        role = self._role(request)
        bucket, key = self._split(rest)
        if bucket not in self.buckets or role != "service_role":
            raise _no_bucket()
        if self.delete_latency:
            await asyncio.sleep(self.delete_latency)
        if self.objects.pop((bucket, key), None) is None:
            raise _no_key()
        return web.json_response({"message": "Successfully deleted"})

    def _sign(self, request: web.Request, rest: str, body: bytes) -> web.Response:
        role = self._role(request)
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            raise _invalid_request("body must be object") from None
        if not isinstance(data, dict) or "expiresIn" not in data:
            raise _invalid_request("body must have required property 'expiresIn'")
        expires_in = data["expiresIn"]
        if isinstance(expires_in, bool) or not isinstance(expires_in, int):
            raise _invalid_request("body/expiresIn must be integer")
        if expires_in < 1:
            raise _invalid_request("body/expiresIn must be >= 1")
        bucket, key = self._split(rest)
        if bucket not in self.buckets:
            raise _no_bucket()
        # RLS hides the row from anyone but the service role (no policies on a fresh project).
        if role != "service_role" or (bucket, key) not in self.objects:
            raise _no_key()
        iat = self.now()
        token = make_jwt(
            {"url": f"{bucket}/{key}", "scope": "download", "iat": iat, "exp": iat + expires_in},
            self.jwt_secret,
            header={"alg": "HS256"},
        )
        return web.json_response({"signedURL": f"/object/sign/{bucket}/{key}?token={token}"})

    def _signed_download(self, request: web.Request, rest: str, query: dict[str, list[str]]) -> web.Response:
        tokens = query.get("token")
        if not tokens:
            raise _invalid_request("querystring must have required property 'token'")
        try:
            payload = verify_jwt(tokens[0], self.jwt_secret)
        except JwtError as exc:
            raise ApiError("400", "InvalidJWT", "InvalidJWT", str(exc)) from None
        exp = payload.get("exp")
        if not isinstance(exp, int) or exp <= self.now():
            raise ApiError("400", "InvalidJWT", "InvalidJWT", '"exp" claim timestamp check failed')
        bucket, key = self._split(rest)
        if payload.get("url") != f"{bucket}/{key}":
            # source: ERRORS.InvalidSignature; not observed in the reference
            raise ApiError(
                "400", "InvalidSignature", "InvalidSignature", "The url do not match the signature"
            )
        response = self._serve(self._object(bucket, key), head=False)
        response.headers["x-robots-tag"] = "none"
        response.headers["expires"] = format_datetime(datetime.fromtimestamp(exp, UTC), usegmt=True)
        return response

    def _serve(self, blob: StoredBlob, *, head: bool) -> web.Response:
        headers = {
            "etag": blob.etag,
            "cache-control": blob.cache_control,
            "last-modified": format_datetime(blob.updated_at, usegmt=True),
            "accept-ranges": "bytes",
        }
        if head:
            headers["Content-Length"] = str(len(blob.data))
            return web.Response(status=200, headers=headers, content_type=None)
        response = web.Response(body=blob.data, headers=headers)
        response.content_type = blob.content_type.split(";")[0]
        return response
