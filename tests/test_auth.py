"""Bearer tokens: who they name, how much clock difference they tolerate, and a verified
token remembered but never past its expiry."""

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
    verifier = TokenVerifier(Settings(jwt_secret=SECRET, jwt_leeway=0))
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


def _token(claims: dict[str, object]) -> str:
    return jwt.encode(claims, SECRET, algorithm="HS256")


def test_a_token_from_a_clock_slightly_ahead_is_accepted() -> None:
    """An iat and nbf 10 s in the future pass within the default 30 s leeway; 2 min do not."""
    verifier = TokenVerifier(Settings(jwt_secret=SECRET))
    now = int(time.time())
    ahead = _token({"sub": "u1", "iat": now + 10, "nbf": now + 10, "exp": now + 600})
    assert verifier.verify(ahead).user_id == "u1"
    far_ahead = _token({"sub": "u2", "iat": now + 120, "nbf": now + 120, "exp": now + 600})
    with pytest.raises(Unauthenticated):
        verifier.verify(far_ahead)


def test_a_token_just_expired_passes_within_the_leeway_only() -> None:
    """A token expired 10 s ago passes with the 30 s leeway and is refused without one."""
    token = _token({"sub": "u1", "exp": int(time.time()) - 10})
    assert TokenVerifier(Settings(jwt_secret=SECRET)).verify(token).user_id == "u1"
    with pytest.raises(Unauthenticated):
        TokenVerifier(Settings(jwt_secret=SECRET, jwt_leeway=0)).verify(token)


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
@pytest.mark.parametrize(
    "value", ["{now}", True, None, [1]], ids=["string", "bool", "null", "list"]
)
def test_a_time_claim_that_is_not_a_number_is_refused(claim: str, value: object) -> None:
    """exp, nbf and iat must be JSON numbers; a numeric string (which would never expire once
    remembered), a boolean or a null is refused."""
    now = int(time.time())
    claims: dict[str, object] = {"sub": "u1", "exp": now + 600}
    claims[claim] = str(now + 3) if value == "{now}" else value
    with pytest.raises(Unauthenticated):
        TokenVerifier(Settings(jwt_secret=SECRET)).verify(_token(claims))


@pytest.mark.parametrize(
    ("claims", "user"),
    [
        ({"sub": None, "id": "admin1"}, "admin1"),
        ({"sub": "", "id": "admin1"}, "admin1"),
        ({"id": 42}, "42"),
        ({"sub": 7}, "7"),
    ],
)
def test_the_user_is_sub_or_else_id(claims: dict[str, object], user: str) -> None:
    """A null, empty or missing sub falls back to id, and numeric ids are read as text."""
    verifier = TokenVerifier(Settings(jwt_secret=SECRET))
    assert verifier.verify(_token(claims)).user_id == user


@pytest.mark.parametrize(
    "claims", [{"sub": "a\x00b"}, {"id": "line\nbreak"}, {"sub": True}, {"sub": None}]
)
def test_a_token_naming_no_usable_user_is_refused(claims: dict[str, object]) -> None:
    """A user id with control characters, a boolean, or no id at all is an invalid session."""
    with pytest.raises(Unauthenticated):
        TokenVerifier(Settings(jwt_secret=SECRET)).verify(_token(claims))
