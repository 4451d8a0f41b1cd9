"""Signatures and headers of an outbound request; pure, no I/O.

Two schemes travel side by side so receivers can verify either way: the body HMAC that
GitHub popularised (``X-Dembrane-Signature: sha256=<hex>``) and Standard Webhooks
(``webhook-signature: v1,<base64>`` over ``id.timestamp.body``, which also stops replays).
"""

from __future__ import annotations

import base64
import functools
import hmac
import secrets as _random
from collections.abc import Sequence

from dembrane.webhooks import __version__
from dembrane.webhooks.domain.webhooks import STANDARD_PREFIX as SECRET_PREFIX
from dembrane.webhooks.domain.webhooks import decoded_standard_key

__all__ = [
    "SECRET_PREFIX",
    "body_signature",
    "generate_secret",
    "signature_headers",
    "standard_key",
    "standard_signature",
    "user_agent",
]


_USER_AGENT = f"Dembrane-Webhook/{__version__}"


# Keyed HMAC states, one per secret and scheme, copied for each message: a copy skips the
# key schedule, and hashing a body under 2 kB this way keeps the interpreter lock (the
# one-shot ``hmac.digest`` always lets it go, and the event loop then waits to get it back
# from the store's thread). The cache holds secrets the dispatcher holds anyway.
_KEYED_CACHE_SIZE = 1024


@functools.lru_cache(maxsize=_KEYED_CACHE_SIZE)
def _body_hmac(secret: str) -> hmac.HMAC:
    return hmac.new(secret.encode(), digestmod="sha256")


@functools.lru_cache(maxsize=_KEYED_CACHE_SIZE)
def _standard_hmac(secret: str) -> hmac.HMAC:
    return hmac.new(standard_key(secret), digestmod="sha256")


def _digest(keyed: hmac.HMAC, *parts: bytes) -> bytes:
    state = keyed.copy()
    for part in parts:
        state.update(part)
    return state.digest()


def body_signature(secret: str, body: bytes) -> str:
    """``sha256=`` + lowercase hex HMAC-SHA256 of ``body``, keyed by the secret's UTF-8 bytes."""
    return "sha256=" + _digest(_body_hmac(secret), body).hex()


def standard_key(secret: str) -> bytes:
    """The Standard Webhooks HMAC key of ``secret``.

    For ``whsec_<base64>`` secrets it is the decoded part after the prefix; any other
    secret (or one whose tail is not base64) signs with its own UTF-8 bytes.
    """
    return decoded_standard_key(secret) or secret.encode()


def standard_signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """``v1,`` + base64 HMAC-SHA256 over ``{msg_id}.{timestamp}.{body}``."""
    digest = _digest(_standard_hmac(secret), f"{msg_id}.{timestamp}.".encode(), body)
    return "v1," + base64.b64encode(digest).decode("ascii")


def signature_headers(
    *,
    secrets: Sequence[str],
    event_type: str,
    event_id: str,
    delivery_id: str,
    timestamp: int,
    body: bytes,
    user_agent: str,
) -> dict[str, str]:
    """Every header of the request a receiver gets, signatures included.

    ``secrets[0]`` is the current secret and alone makes the ``sha256=`` headers; during a
    rotation's grace period the older secrets add their own ``v1,`` signature, space-separated.
    """
    if not secrets:
        raise ValueError("Signing needs at least one secret.")
    body_sig = body_signature(secrets[0], body)
    prefix = f"{event_id}.{timestamp}.".encode()
    standard = " ".join(
        "v1," + base64.b64encode(_digest(_standard_hmac(s), prefix, body)).decode("ascii")
        for s in secrets
    )
    return {
        "Content-Type": "application/json",
        "User-Agent": user_agent,
        "X-Dembrane-Event": event_type,
        "X-Webhook-Event": event_type,
        "X-Dembrane-Delivery": delivery_id,
        "X-Dembrane-Signature": body_sig,
        "X-Webhook-Signature": body_sig,
        "webhook-id": event_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": standard,
    }


def generate_secret() -> str:
    """A fresh secret: ``whsec_`` + base64 of 24 random bytes."""
    return SECRET_PREFIX + base64.b64encode(_random.token_bytes(24)).decode("ascii")


def user_agent() -> str:
    """The ``User-Agent`` of every outbound request: ``Dembrane-Webhook/<version>``."""
    return _USER_AGENT
