"""Pagination: page sizes and opaque page tokens.

A token is the base64 of the last row's sort key, so a page continues exactly after the
previous one even when rows are added meanwhile (keyset pagination), and of a digest of
the list it belongs to (the call, the project or webhook, the filters): a token handed to
another list is refused rather than read as a position in it, which could end that list
early or skip rows.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from dataclasses import dataclass

from dembrane.webhooks.domain.errors import InvalidArgument
from dembrane.webhooks.domain.text import has_control_characters

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200


@dataclass(frozen=True)
class Cursor:
    """Where the previous page ended: the last row's creation time and id."""

    created_at: float
    id: str


def page_size(requested: int) -> int:
    """The effective page size: the default for zero, at most the maximum."""
    if requested < 0:
        raise InvalidArgument.for_field("page_size", "The page size must not be negative.")
    if requested == 0:
        return DEFAULT_PAGE_SIZE
    return min(requested, MAX_PAGE_SIZE)


def _digest(listing: str) -> str:
    return hashlib.sha256(listing.encode()).hexdigest()[:12]


def encode_token(cursor: Cursor, listing: str) -> str:
    """The token of the page after ``cursor`` in the list ``listing`` names."""
    raw = json.dumps(
        [cursor.created_at, cursor.id, _digest(listing)], separators=(",", ":")
    ).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str, listing: str) -> Cursor | None:
    """The cursor inside a token of the list ``listing`` names; ``None`` for an empty
    token; an error for a bad one or one of another list."""
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        created_at, row_id, digest = json.loads(raw)
        if (
            not isinstance(created_at, int | float)
            or not math.isfinite(created_at)
            or not isinstance(row_id, str)
            or has_control_characters(row_id)
            or not isinstance(digest, str)
        ):
            raise ValueError
    except (ValueError, TypeError, binascii.Error):
        raise InvalidArgument.for_field(
            "page_token", "The page token is not one this service issued."
        ) from None
    if digest != _digest(listing):
        raise InvalidArgument.for_field(
            "page_token",
            "The page token belongs to another list (another call, project, webhook or "
            "filter); ask for the first page again without it.",
        )
    return Cursor(float(created_at), row_id)
