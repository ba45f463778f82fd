"""The signature a receiver checks: HMAC-SHA256 over the timestamp and the raw body.

The signed string is ``<timestamp>.<body>``: the decimal Unix time in ``X-Imagen-Timestamp``,
a dot, then the request body byte for byte. Signing the timestamp too means a captured
request cannot be replayed later with a fresh timestamp; a receiver refuses timestamps more
than a few minutes away from its clock and remembers ``X-Imagen-Delivery`` ids it has seen.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

SIGNATURE = "X-Imagen-Signature"
TIMESTAMP = "X-Imagen-Timestamp"
DELIVERY = "X-Imagen-Delivery"
EVENT = "X-Imagen-Event"
SCHEME = "sha256="
TOLERANCE = 300.0  # seconds a receiver accepts between the timestamp and its own clock


def signature(secret: bytes, timestamp: int, body: bytes) -> str:
    """The ``X-Imagen-Signature`` value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256)
    return SCHEME + mac.hexdigest()


def verify(
    secret: bytes, headers: Mapping[str, str], body: bytes, *, now: float, tolerance: float = TOLERANCE
) -> bool:
    """Whether a received request is authentic and fresh (what a Python receiver runs)."""
    lowered = {name.lower(): value for name, value in headers.items()}
    stamp = lowered.get(TIMESTAMP.lower(), "")
    given = lowered.get(SIGNATURE.lower(), "")
    if not stamp.isdigit() or abs(now - int(stamp)) > tolerance:
        return False
    return hmac.compare_digest(signature(secret, int(stamp), body), given)
