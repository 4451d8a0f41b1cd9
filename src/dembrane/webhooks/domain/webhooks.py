"""The rules of a webhook's fields: what a valid name, URL, event list, secret and status are.

Validation collects every bad field so the caller hears of all of them at once; the first
one's sentence becomes the error message (the REST ``detail``).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Sequence
from enum import StrEnum

from dembrane.webhooks.domain.errors import ErrorCollector, InvalidArgument
from dembrane.webhooks.domain.payload import WEBHOOK_TEST
from dembrane.webhooks.domain.text import (
    has_control_characters,
    has_direction_controls,
    is_invisible,
)

NAME_MAX = 200
URL_MAX = 2048
SECRET_MIN = 8
SECRET_MAX = 256
#: How long a rotated-out secret keeps signing, unless the rotation says otherwise.
DEFAULT_GRACE_SECONDS = 24 * 3600
#: The longest grace period a rotation may ask for.
MAX_GRACE_SECONDS = 7 * 24 * 3600
#: The prefix of secrets in the Standard Webhooks form: ``whsec_`` + base64 of the key.
STANDARD_PREFIX = "whsec_"


class WebhookStatus(StrEnum):
    """Where a webhook stands; see the contract's REST section."""

    PUBLISHED = "published"
    DRAFT = "draft"
    ARCHIVED = "archived"
    DISABLED = "disabled"


# Statuses a person may set; `disabled` is the service's to set.
SETTABLE_STATUSES = (WebhookStatus.PUBLISHED, WebhookStatus.DRAFT, WebhookStatus.ARCHIVED)


def check_name(name: str, errors: ErrorCollector) -> str:
    cleaned = name.strip()
    if is_invisible(cleaned):
        errors.add("name", "The name must not be empty.")
    elif len(cleaned) > NAME_MAX:
        errors.add("name", f"The name must be at most {NAME_MAX} characters long.")
    elif has_control_characters(cleaned):
        errors.add("name", "The name must not contain control characters or line breaks.")
    elif has_direction_controls(cleaned):
        # Names are shown to other projects' admins (copyable webhooks): no disguises.
        errors.add(
            "name",
            "The name must not contain characters that change the direction of text "
            "(such as U+202E).",
        )
    return cleaned


def check_events(events: Sequence[str], known: Iterable[str], errors: ErrorCollector) -> list[str]:
    """Keep the order of first appearance, drop duplicates, refuse unknown types."""
    catalog = set(known)
    seen: list[str] = []
    unknown: list[str] = []
    for event in events:
        name = event.strip()
        if name not in catalog:
            unknown.append(event)
        elif name not in seen:
            seen.append(name)
    if unknown:
        types = ", ".join(sorted(catalog))
        others = [u for u in unknown if u.strip() != WEBHOOK_TEST]
        if others:
            listed = ", ".join(repr(u) for u in others)
            message = f"Unknown event type {listed}; the types to subscribe to are {types}."
        else:
            message = f"The types to subscribe to are {types}."
        if len(others) < len(unknown):
            # Listed by ListEventTypes, so not unknown: say why it cannot be chosen.
            message = (
                f"{WEBHOOK_TEST} cannot be subscribed to: the Test action sends it to any "
                f"webhook. {message}"
            )
        errors.add("events", message)
    elif not seen:
        errors.add("events", "A webhook must subscribe to at least one event type.")
    return seen


def check_secret(secret: str, errors: ErrorCollector) -> str:
    if len(secret) < SECRET_MIN or len(secret) > SECRET_MAX:
        errors.add(
            "secret",
            f"The secret must be between {SECRET_MIN} and {SECRET_MAX} characters long.",
        )
    elif secret != secret.strip() or has_control_characters(secret):
        errors.add(
            "secret",
            "The secret must not contain whitespace at its ends, line breaks or control "
            "characters.",
        )
    elif secret.startswith(STANDARD_PREFIX):
        key = decoded_standard_key(secret)
        if key is None:
            # Standard Webhooks libraries decode what follows the prefix; they could never
            # verify a signature made with such a secret.
            errors.add(
                "secret",
                f"A secret that starts with {STANDARD_PREFIX} must continue with the base64 "
                "of its key, as Standard Webhooks libraries expect.",
            )
        elif len(secret) % 4 != len(STANDARD_PREFIX) % 4:
            # Go's Standard Webhooks library, among others, refuses base64 without it.
            errors.add(
                "secret",
                f"The base64 after {STANDARD_PREFIX} must keep its padding: '=' up to a "
                "multiple of 4 characters, as every Standard Webhooks library reads it.",
            )
        elif len(key) < SECRET_MIN:
            # The key is what signs: whsec_QUJD passes the length check but is 3 bytes.
            errors.add(
                "secret",
                f"The key of a {STANDARD_PREFIX} secret must be at least {SECRET_MIN} bytes "
                f"long once decoded; this one is {len(key)}.",
            )
    return secret


def decoded_standard_key(secret: str) -> bytes | None:
    """The key of a ``whsec_<base64>`` secret; None for a secret not of that form."""
    if not secret.startswith(STANDARD_PREFIX):
        return None
    encoded = secret[len(STANDARD_PREFIX) :]
    # Some issuers drop the padding; restore it so both spellings give the same key.
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
    return key or None


def check_status(status: str, errors: ErrorCollector) -> WebhookStatus | None:
    """A person may set published, draft or archived."""
    try:
        parsed = WebhookStatus(status)
    except ValueError:
        parsed = None
    if parsed not in SETTABLE_STATUSES:
        names = ", ".join(s.value for s in SETTABLE_STATUSES[:-1])
        settable = f"{names} or {SETTABLE_STATUSES[-1].value}"
        errors.add(
            "status",
            f"The status can be set to {settable}; "
            f"{WebhookStatus.DISABLED.value} is set only by the service."
            if parsed is WebhookStatus.DISABLED
            else f"The status must be {settable}.",
        )
        return None
    return parsed


def require(value: str, field: str, what: str) -> str:
    """A required identifier: refuse empty ones with a sentence naming the field."""
    cleaned = value.strip()
    if not cleaned:
        raise InvalidArgument.for_field(field, f"The {what} is required.")
    if has_control_characters(cleaned):
        raise InvalidArgument.for_field(field, f"The {what} must not contain control characters.")
    return cleaned


def signing_secrets(
    secret: str, previous: str | None, previous_expires_at: float | None, now: float
) -> tuple[str, ...]:
    """The secrets a request is signed with: the current one first, then the previous one
    while its rotation's grace period lasts (``previous_expires_at`` in Unix seconds)."""
    if previous and previous_expires_at is not None and previous_expires_at > now:
        return (secret, previous)
    return (secret,)
