"""Bearer-token verification and the principal it yields. No gRPC, no SQL.

Tokens are JWTs: HS256 with ``WEBHOOKS_JWT_SECRET`` or RS256/ES256 with the PEM public key in
``WEBHOOKS_JWT_PUBLIC_KEY``. The user is the ``sub`` claim, or ``id`` for tokens of the
platform's existing auth server; ``admin_access: true`` marks platform staff; ``scope`` grants
service rights.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import jwt
from jwt.warnings import InsecureKeyLengthWarning

from dembrane.webhooks.config import Settings
from dembrane.webhooks.domain.errors import ScopeRequired, Unauthenticated
from dembrane.webhooks.domain.text import has_control_characters

# A short key is reported once at start (Settings.warnings), not at the first call.
warnings.filterwarnings("ignore", category=InsecureKeyLengthWarning)

SCOPE_PUBLISH = "webhooks:publish"
SCOPE_DIRECTORY = "webhooks:directory"

# What every authentication failure says: the caller learns nothing about why.
INVALID_SESSION = "Invalid session"

#: The longest ``authorization`` value (``Bearer `` and the token) the service takes, over
#: gRPC and REST alike. gRPC refuses a call whose metadata passes 8 KiB (its default soft
#: limit, counted over every entry, the path and user agent included), so a longer value
#: would work on some calls and not on others; 7 KiB leaves room for the rest of the call's
#: metadata, and is far above any real JWT.
MAX_AUTHORIZATION_LENGTH = 7168


@dataclass(frozen=True)
class Principal:
    """Who is calling: a platform user, platform staff, or a backend service."""

    user_id: str
    is_staff: bool = False
    scopes: frozenset[str] = frozenset()

    def require_scope(self, scope: str) -> None:
        """Refuse the call unless the token grants ``scope``."""
        if scope not in self.scopes:
            raise ScopeRequired(f"This call needs the {scope} scope.", metadata={"scope": scope})


#: How many verified tokens are remembered (all are forgotten when it fills up).
_VERIFIED_CACHE_SIZE = 4096


class TokenVerifier:
    """Verifies bearer tokens against the configured key."""

    def __init__(self, settings: Settings) -> None:
        self._issuer = settings.jwt_issuer
        self._audience = settings.jwt_audience
        self._leeway = settings.jwt_leeway
        self._keys: list[tuple[str | bytes, list[str]]] = []
        if settings.jwt_secret:
            self._keys.append((settings.jwt_secret, ["HS256"]))
        if settings.jwt_public_key:
            self._keys.append((settings.jwt_public_key.encode(), ["RS256", "ES256"]))
        # Tokens verified before, with when they expire: a backend publishing thousands of
        # events a second presents the same token every time, and checking a signature
        # costs more than the rest of the call's bookkeeping.
        self._verified: dict[str, tuple[Principal, float | None]] = {}

    @property
    def configured(self) -> bool:
        """Whether any key is set; without one every call is refused."""
        return bool(self._keys)

    def verify_header(self, authorization: str | None) -> Principal:
        """Turn an ``authorization`` value (``Bearer <JWT>``) into a principal."""
        if not authorization or len(authorization.strip()) > MAX_AUTHORIZATION_LENGTH:
            raise Unauthenticated(INVALID_SESSION)
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated(INVALID_SESSION)
        return self.verify(token.strip())

    def verify(self, token: str) -> Principal:
        """Check the token's signature and claims; raise ``Unauthenticated`` otherwise."""
        known = self._verified.get(token)
        if known is not None:
            principal, expires = known
            if expires is None or time.time() < expires:
                return principal
            del self._verified[token]
        claims = self._decode(token)
        principal = principal_from_claims(claims)
        exp = claims.get("exp")
        if len(self._verified) >= _VERIFIED_CACHE_SIZE:
            self._verified.clear()
        self._verified[token] = (
            principal,
            float(exp) + self._leeway if isinstance(exp, int | float) else None,
        )
        return principal

    def _decode(self, token: str) -> dict[str, object]:
        claims: dict[str, object] | None = None
        for key, algorithms in self._keys:
            try:
                claims = jwt.decode(
                    token,
                    key,
                    algorithms=algorithms,
                    issuer=self._issuer,
                    audience=self._audience,
                    # The issuer's clock may run a little ahead (iat, nbf) or behind (exp).
                    leeway=self._leeway,
                    options={
                        "require": [],
                        # The user may be named by `id` instead (a null or numeric `sub`
                        # included); principal_from_claims reads and checks both.
                        "verify_sub": False,
                        "verify_aud": self._audience is not None,
                        "verify_iss": self._issuer is not None,
                    },
                )
                break
            except jwt.PyJWTError:
                continue
        if claims is None:
            raise Unauthenticated(INVALID_SESSION)
        # JWT times are numbers (RFC 7519 NumericDate); the decoder also takes "1764331200".
        for name in ("exp", "nbf", "iat"):
            if name in claims and not _numeric_date(claims[name]):
                raise Unauthenticated(INVALID_SESSION)
        return claims


def _numeric_date(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def principal_from_claims(claims: dict[str, object]) -> Principal:
    """Read the user, staff flag and scopes out of verified claims."""
    subject = claims.get("sub") or claims.get("id")
    if not isinstance(subject, str | int) or isinstance(subject, bool):
        raise Unauthenticated(INVALID_SESSION)
    user_id = str(subject)
    if not user_id or has_control_characters(user_id):
        raise Unauthenticated(INVALID_SESSION)
    scope = claims.get("scope")
    scopes = frozenset(scope.split()) if isinstance(scope, str) else frozenset()
    return Principal(user_id=user_id, is_staff=claims.get("admin_access") is True, scopes=scopes)


def mint_token(
    secret: str,
    subject: str,
    *,
    scopes: Iterable[str] = (),
    staff: bool = False,
    ttl_seconds: int = 3600,
    issuer: str | None = None,
    audience: str | None = None,
) -> str:
    """Make an HS256 token, for development, tests and the ``token`` command."""
    now = int(time.time())
    claims: dict[str, object] = {"sub": subject, "iat": now, "exp": now + ttl_seconds}
    scope_list = sorted(set(scopes))
    if scope_list:
        claims["scope"] = " ".join(scope_list)
    if staff:
        claims["admin_access"] = True
    if issuer:
        claims["iss"] = issuer
    if audience:
        claims["aud"] = audience
    return jwt.encode(claims, secret, algorithm="HS256")
