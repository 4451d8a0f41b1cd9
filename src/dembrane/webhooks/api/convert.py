"""Conversions between store rows / domain values and protobuf messages. Only ``api/`` does this."""

from __future__ import annotations

import math

from google.protobuf.timestamp_pb2 import Timestamp

from dembrane.webhooks.domain.errors import InvalidArgument
from dembrane.webhooks.domain.webhooks import WebhookStatus
from dembrane.webhooks.store.tables import WebhookRow
from dembrane.webhooks.store.webhooks import events_of
from dembrane.webhooks.v1 import webhook_pb2

_STATUS_TO_PB = {
    WebhookStatus.PUBLISHED: webhook_pb2.WEBHOOK_STATUS_PUBLISHED,
    WebhookStatus.DRAFT: webhook_pb2.WEBHOOK_STATUS_DRAFT,
    WebhookStatus.ARCHIVED: webhook_pb2.WEBHOOK_STATUS_ARCHIVED,
    WebhookStatus.DISABLED: webhook_pb2.WEBHOOK_STATUS_DISABLED,
}
_PB_TO_STATUS = {value: key for key, value in _STATUS_TO_PB.items()}


def timestamp(seconds: float) -> Timestamp:
    """A protobuf timestamp for Unix seconds, to the microsecond the store keeps (as the
    REST gateway shows it). Nanoseconds from the float would carry its rounding noise
    (``.928662528``), and whole microseconds are rounded down, so a time read here and
    passed back as a range's start still includes what it was read from."""
    ts = Timestamp()
    ts.FromMicroseconds(math.floor(seconds * 1_000_000))
    return ts


def seconds(ts: Timestamp) -> float:
    return ts.seconds + ts.nanos / 1e9


# What google.protobuf.Timestamp allows: 0001-01-01 to 9999-12-31, nanos within a second.
_MIN_SECONDS = -62_135_596_800
_MAX_SECONDS = 253_402_300_799


def valid_seconds(ts: Timestamp, field: str) -> float:
    """``seconds(ts)``; ``InvalidArgument`` naming ``field`` when ``ts`` is not a valid time."""
    if not (0 <= ts.nanos < 1_000_000_000 and _MIN_SECONDS <= ts.seconds <= _MAX_SECONDS):
        raise InvalidArgument.for_field(field, f"The {field} is not a valid time.")
    return seconds(ts)


def webhook_status_from_pb(value: int) -> str:
    """The status string for a proto enum value; an empty string for unspecified or unknown."""
    status = _PB_TO_STATUS.get(value)  # type: ignore[call-overload]
    return status.value if status is not None else ""


def webhook_to_pb(row: WebhookRow) -> webhook_pb2.Webhook:
    message = webhook_pb2.Webhook(
        id=row.id,
        project_id=row.project_id,
        name=row.name,
        url=row.url,
        events=events_of(row),
        status=_STATUS_TO_PB[WebhookStatus(row.status)],
        disabled_reason=row.disabled_reason,
    )
    message.create_time.CopyFrom(timestamp(row.created_at))
    message.update_time.CopyFrom(timestamp(row.updated_at))
    return message
