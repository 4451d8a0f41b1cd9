"""Bearer tokens: a verified token is remembered, but never past its expiry."""

from __future__ import annotations

import time

import jwt
import pytest

from dembrane.webhooks.auth import TokenVerifier, mint_token
from dembrane.webhooks.config import Settings
from dembrane.webhooks.domain.errors import Unauthenticated

SECRET = "a-test-secret-that-is-long-enough-for-hs256"


def test_a_remembered_token_gives_the_same_principal() -> None:
    """Verifying the same token twice gives the same user and scopes both times."""
    verifier = TokenVerifier(Settings(jwt_secret=SECRET))
    token = mint_token(SECRET, "svc", scopes=["webhooks:publish"])
    first = verifier.verify(token)
    again = verifier.verify(token)
    assert first == again
    assert (again.user_id, again.scopes) == ("svc", frozenset({"webhooks:publish"}))


def test_a_remembered_token_is_refused_once_it_expires() -> None:
    """A token verified while valid is refused after its exp, though it was remembered."""
    verifier = TokenVerifier(Settings(jwt_secret=SECRET))
    token = mint_token(SECRET, "svc", ttl_seconds=1)
    assert verifier.verify(token).user_id == "svc"
    expires = jwt.decode(token, options={"verify_signature": False})["exp"]
    time.sleep(max(0.0, expires - time.time()) + 0.05)
    with pytest.raises(Unauthenticated):
        verifier.verify(token)


def test_a_forged_token_is_never_remembered() -> None:
    """A token signed with another key is refused every time, even after a good one."""
    verifier = TokenVerifier(Settings(jwt_secret=SECRET))
    verifier.verify(mint_token(SECRET, "svc"))
    forged = jwt.encode({"sub": "svc", "exp": int(time.time()) + 60}, "x" * 40, algorithm="HS256")
    for _ in range(2):
        with pytest.raises(Unauthenticated):
            verifier.verify(forged)
