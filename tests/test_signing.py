"""Signatures and headers of outbound requests, pinned by the contract's test vectors."""

from __future__ import annotations

import base64
import re
import time

import pytest
from standardwebhooks.webhooks import Webhook

from dembrane.webhooks import __version__
from dembrane.webhooks.delivery.signing import (
    body_signature,
    generate_secret,
    signature_headers,
    standard_key,
    standard_signature,
    user_agent,
)
from dembrane.webhooks.domain.payload import canonical_json

from receiver import standard_webhook_for

VECTOR3_BODY = (
    b'{"event":"conversation.started","id":"evt_1","project":'
    b'{"id":"p1","language":"nl","name":"Caf\\u00e9"}}'
)


def test_body_signature_matches_githubs_published_example() -> None:
    """The body HMAC reproduces GitHub's documented example (contract vector 1)."""
    assert body_signature("It's a Secret to Everybody", b"Hello, World!") == (
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    )


def test_standard_signature_matches_the_specs_example() -> None:
    """A whsec_ secret signs as the Standard Webhooks spec's example does (contract vector 2)."""
    assert standard_signature(
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        1614265330,
        b'{"test": 2432232314}',
    ) == ("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=")


def test_plain_secret_signs_the_canonical_body_as_the_contract_says() -> None:
    """A plain secret gives the contract's two signatures over the canonical body (vector 3)."""
    body = canonical_json(
        {
            "event": "conversation.started",
            "id": "evt_1",
            "project": {"id": "p1", "language": "nl", "name": "Café"},
        }
    )
    assert body == VECTOR3_BODY
    assert body_signature("my-shared-secret", body) == (
        "sha256=e766d7fd8653f6403cd4019880a99b85b1bc3bcfd3c11b93b32f2db239f5980a"
    )
    assert standard_signature("my-shared-secret", "evt_1", 1764331200, body) == (
        "v1,jvKCD3YdJvvXJyoVsh69WgkUL0K78he0V03fNrZxXcc="
    )


def test_standard_key_accepts_unpadded_whsec_and_falls_back_to_utf8() -> None:
    """whsec_ keys decode with or without padding; a tail that is not base64 signs as text."""
    assert standard_key("whsec_AAEC") == b"\x00\x01\x02"
    assert standard_key("whsec_AAECAw") == b"\x00\x01\x02\x03"
    assert standard_key("whsec_not base64!") == b"whsec_not base64!"
    assert standard_key("plain") == b"plain"


def _headers(secrets: tuple[str, ...], timestamp: int = 1764331200) -> dict[str, str]:
    return signature_headers(
        secrets=secrets,
        event_type="conversation.started",
        event_id="evt_1",
        delivery_id="dlv_1",
        timestamp=timestamp,
        body=VECTOR3_BODY,
        user_agent=user_agent(),
    )


def test_signature_headers_are_the_complete_contract_set() -> None:
    """Every header of the contract is present with the value it prescribes."""
    headers = _headers(("my-shared-secret",))
    assert headers == {
        "Content-Type": "application/json",
        "User-Agent": f"Dembrane-Webhook/{__version__}",
        "X-Dembrane-Event": "conversation.started",
        "X-Webhook-Event": "conversation.started",
        "X-Dembrane-Delivery": "dlv_1",
        "X-Dembrane-Signature": (
            "sha256=e766d7fd8653f6403cd4019880a99b85b1bc3bcfd3c11b93b32f2db239f5980a"
        ),
        "X-Webhook-Signature": (
            "sha256=e766d7fd8653f6403cd4019880a99b85b1bc3bcfd3c11b93b32f2db239f5980a"
        ),
        "webhook-id": "evt_1",
        "webhook-timestamp": "1764331200",
        "webhook-signature": "v1,jvKCD3YdJvvXJyoVsh69WgkUL0K78he0V03fNrZxXcc=",
    }


def test_rotation_signs_with_every_secret_and_body_hmac_with_the_current_one() -> None:
    """During a rotation webhook-signature holds one v1 signature per secret, space-separated."""
    new, old = generate_secret(), "my-shared-secret"
    headers = _headers((new, old))
    signatures = headers["webhook-signature"].split(" ")
    assert signatures == [
        standard_signature(new, "evt_1", 1764331200, VECTOR3_BODY),
        standard_signature(old, "evt_1", 1764331200, VECTOR3_BODY),
    ]
    assert headers["X-Dembrane-Signature"] == body_signature(new, VECTOR3_BODY)


def test_signing_without_a_secret_is_refused() -> None:
    """Signing needs at least one secret."""
    with pytest.raises(ValueError, match="at least one secret"):
        _headers(())


@pytest.mark.parametrize("secret", ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "my-shared-secret"])
def test_standardwebhooks_library_verifies_the_signature(secret: str) -> None:
    """The standardwebhooks library accepts webhook-signature for whsec_ and plain secrets."""
    now = int(time.time())
    headers = _headers((secret,), timestamp=now)
    verifier = standard_webhook_for(secret)
    assert verifier.verify(VECTOR3_BODY, headers) == {
        "event": "conversation.started",
        "id": "evt_1",
        "project": {"id": "p1", "language": "nl", "name": "Café"},
    }


def test_plain_secret_needs_wrapping_for_the_standardwebhooks_library() -> None:
    """A plain secret verifies in the library as whsec_ + base64 of its UTF-8 bytes."""
    now = int(time.time())
    headers = _headers(("my-shared-secret",), timestamp=now)
    wrapped = "whsec_" + base64.b64encode(b"my-shared-secret").decode()
    Webhook(wrapped).verify(VECTOR3_BODY, headers)


def test_rotated_headers_verify_with_either_secret_in_the_library() -> None:
    """A receiver still on the old secret, or already on the new one, verifies a rotation."""
    new, old = generate_secret(), generate_secret()
    headers = _headers((new, old), timestamp=int(time.time()))
    standard_webhook_for(new).verify(VECTOR3_BODY, headers)
    standard_webhook_for(old).verify(VECTOR3_BODY, headers)


def test_generated_secret_is_whsec_and_24_random_bytes() -> None:
    """A generated secret is whsec_ + base64 of 24 random bytes, different every time."""
    secret = generate_secret()
    assert re.fullmatch(r"whsec_[A-Za-z0-9+/]{32}", secret)
    assert len(base64.b64decode(secret.removeprefix("whsec_"))) == 24
    assert standard_key(secret) == base64.b64decode(secret.removeprefix("whsec_"))
    assert generate_secret() != secret


def test_user_agent_names_the_service_and_version() -> None:
    """The User-Agent is Dembrane-Webhook/<version>."""
    assert user_agent() == f"Dembrane-Webhook/{__version__}"
