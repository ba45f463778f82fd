"""One HTTP attempt at a webhook, and what its answer means for the next one.

A 2xx answer delivers. A 5xx, a 429, a timeout or a failed connection is worth retrying; any
other answer (a 4xx, or a 3xx: redirects are not followed, so a signed body never lands
somewhere the operator did not name) is a rejection that no retry would change.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

import httpx

from imagen_worker import __version__
from imagen_worker.webhooks import signing


class DeliveryError(Exception):
    """A failed attempt; ``message`` is the sentence stored in ``last_error``."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Retryable(DeliveryError):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Rejected(DeliveryError):
    pass


@dataclass(frozen=True)
class Request:
    delivery_id: str
    event: str
    body: bytes


class Sender:
    def __init__(self, client: httpx.AsyncClient, url: str, secret: bytes, timeout: float) -> None:
        self.client = client
        self.url = url
        self.secret = secret
        self.timeout = timeout

    def headers(self, request: Request, timestamp: int) -> dict[str, str]:
        return {
            "Content-Type": "application/json",
            "User-Agent": f"imagen-worker/{__version__}",
            signing.EVENT: request.event,
            signing.DELIVERY: request.delivery_id,
            signing.TIMESTAMP: str(timestamp),
            signing.SIGNATURE: signing.signature(self.secret, timestamp, request.body),
        }

    async def send(self, request: Request) -> None:
        """One POST, signed at send time; raises ``Retryable`` or ``Rejected`` unless delivered."""
        headers = self.headers(request, int(time.time()))
        try:
            async with asyncio.timeout(self.timeout):  # httpx's timeout bounds each read, not the whole
                response = await self.client.post(
                    self.url, content=request.body, headers=headers, timeout=self.timeout
                )
        except (httpx.TimeoutException, TimeoutError):
            raise Retryable(f"the receiver did not answer within {self.timeout:g} s") from None
        except httpx.TransportError as exc:
            raise Retryable(f"could not reach the receiver: {_reason(exc)}") from None
        status = response.status_code
        if 200 <= status < 300:
            return
        answer = f"the receiver answered HTTP {status} {response.reason_phrase}".rstrip()
        if status >= 500 or status == 429:
            raise Retryable(answer, _retry_after(response.headers.get("retry-after")))
        if 300 <= status < 400:
            raise Rejected(f"{answer} (redirects are not followed)")
        raise Rejected(answer)


def _reason(exc: Exception) -> str:
    text = str(exc).strip()
    return text or type(exc).__name__


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds, given as seconds or as an HTTP date; None when absent or bad."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None
