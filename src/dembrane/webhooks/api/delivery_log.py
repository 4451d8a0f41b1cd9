"""The delivery log of a webhook: list, inspect, retry and recover deliveries.

``WebhookService`` checks that the caller manages the project and that the webhook belongs
to it, then calls these functions; they only read and change the webhook's deliveries.
Recovering a time window runs in the background, in small batches, so that re-queueing a
large number of failed deliveries never holds the store for long.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from google.protobuf.duration_pb2 import Duration
from sqlmodel import Session

from dembrane.webhooks import metrics
from dembrane.webhooks.api.convert import timestamp, valid_seconds
from dembrane.webhooks.domain.access import DELIVERY_NOT_FOUND
from dembrane.webhooks.domain.errors import ErrorCollector, NotFound
from dembrane.webhooks.domain.ids import new_id
from dembrane.webhooks.domain.paging import Cursor, decode_token, encode_token, page_size
from dembrane.webhooks.domain.payload import SUBSCRIBABLE_EVENT_TYPES
from dembrane.webhooks.domain.webhooks import require
from dembrane.webhooks.resources import Resources
from dembrane.webhooks.store import outbox
from dembrane.webhooks.store.outbox import DeliveryState
from dembrane.webhooks.store.tables import AttemptRow, DeliveryRow
from dembrane.webhooks.v1 import webhook_pb2
from dembrane.webhooks.v1 import webhook_service_pb2 as pb

__all__ = [
    "RECOVERY_BATCH_SIZE",
    "attempt_to_pb",
    "delivery_to_pb",
    "get_delivery",
    "list_deliveries",
    "recover_webhook",
    "retry_delivery",
]

log = logging.getLogger(__name__)

#: How many of a delivery's attempts a listed delivery carries (its latest), and how much of
#: each answer's body: enough to read what went wrong at a glance, while a page of 200
#: deliveries stays far below gRPC's default 4 MiB message limit. GetDelivery shows all.
LISTED_ATTEMPTS = 5
LISTED_BODY_CHARACTERS = 500

#: Deliveries re-queued per transaction by a recovery: large enough that a big window is
#: queued in seconds, small enough that publishing waits for no batch for long.
RECOVERY_BATCH_SIZE = 2000

_STATE_TO_PB = {
    DeliveryState.PENDING: webhook_pb2.DELIVERY_STATUS_PENDING,
    DeliveryState.SUCCEEDED: webhook_pb2.DELIVERY_STATUS_SUCCEEDED,
    DeliveryState.FAILED: webhook_pb2.DELIVERY_STATUS_FAILED,
    DeliveryState.SKIPPED: webhook_pb2.DELIVERY_STATUS_SKIPPED,
}
_PB_TO_STATE = {value: key for key, value in _STATE_TO_PB.items()}


def attempt_to_pb(row: AttemptRow, body_limit: int | None = None) -> webhook_pb2.DeliveryAttempt:
    """One logged attempt as the API shows it, with at most ``body_limit`` characters of the
    answer's body (all that is kept when None)."""
    message = webhook_pb2.DeliveryAttempt(
        number=row.number,
        response_body=row.response_body[:body_limit],
        error=row.error,
        success=row.success,
    )
    message.attempt_time.CopyFrom(timestamp(row.attempted_at))
    if row.status_code is not None:
        message.status_code = row.status_code
    latency = Duration()
    latency.FromNanoseconds(int(row.latency_ms * 1_000_000))
    message.latency.CopyFrom(latency)
    return message


def delivery_to_pb(
    row: DeliveryRow, attempts: Sequence[AttemptRow] = (), body_limit: int | None = None
) -> webhook_pb2.Delivery:
    """A delivery as the API shows it, with ``attempts`` (their bodies cut to ``body_limit``
    characters when given)."""
    state = DeliveryState(row.status)
    message = webhook_pb2.Delivery(
        id=row.id,
        webhook_id=row.webhook_id,
        event_id=row.event_id,
        event_type=row.event_type,
        status=_STATE_TO_PB[state],
        attempt_count=row.attempt_count,
        last_error=row.last_error,
        skip_reason=row.skip_reason,
        attempts=[attempt_to_pb(a, body_limit) for a in attempts],
    )
    message.create_time.CopyFrom(timestamp(row.created_at))
    if state is DeliveryState.PENDING and row.next_attempt_at is not None:
        message.next_attempt_time.CopyFrom(timestamp(row.next_attempt_at))
    if row.last_attempt_at is not None:
        message.last_attempt_time.CopyFrom(timestamp(row.last_attempt_at))
    if row.last_status_code is not None:
        message.last_status_code = row.last_status_code
    return message


def _not_found() -> NotFound:
    return NotFound(DELIVERY_NOT_FOUND, metadata={"resource": "delivery"})


async def list_deliveries(
    resources: Resources, request: pb.ListDeliveriesRequest
) -> pb.ListDeliveriesResponse:
    """A page of the webhook's deliveries, newest first, filtered by status and type."""
    errors = ErrorCollector()
    status: DeliveryState | None = None
    if request.status != webhook_pb2.DELIVERY_STATUS_UNSPECIFIED:
        status = _PB_TO_STATE.get(request.status)
        if status is None:
            errors.add("status", "The delivery status filter is not a known status.")
    event_type = request.event_type.strip()
    if event_type and event_type not in SUBSCRIBABLE_EVENT_TYPES:
        known = ", ".join(sorted(SUBSCRIBABLE_EVENT_TYPES))
        errors.add(
            "event_type", f"The event type {event_type!r} is unknown; the known types are {known}."
        )
    errors.raise_if_any()
    limit = page_size(request.page_size)
    listing = f"ListDeliveries {request.webhook_id} {status} {event_type}"
    after = decode_token(request.page_token, listing)

    def page(session: Session) -> tuple[list[DeliveryRow], dict[str, list[AttemptRow]]]:
        rows = outbox.list_deliveries(
            session,
            request.webhook_id,
            status=status,
            event_type=event_type or None,
            limit=limit,
            after=after,
        )
        shown = [r.id for r in rows[:limit]]
        return rows, outbox.latest_attempts(session, shown, LISTED_ATTEMPTS)

    rows, attempts = await resources.database.run(page)
    token = ""
    if len(rows) > limit:
        rows = rows[:limit]
        token = encode_token(Cursor(rows[-1].created_at, rows[-1].id), listing)
    return pb.ListDeliveriesResponse(
        deliveries=[
            delivery_to_pb(r, attempts.get(r.id, ()), LISTED_BODY_CHARACTERS) for r in rows
        ],
        next_page_token=token,
    )


async def get_delivery(
    resources: Resources, request: pb.GetDeliveryRequest
) -> pb.GetDeliveryResponse:
    """One delivery of the webhook, with every attempt made for it."""
    found = await resources.database.run(
        outbox.get_delivery,
        request.webhook_id,
        require(request.delivery_id, "delivery_id", "delivery id"),
    )
    if found is None:
        raise _not_found()
    row, attempts = found
    return pb.GetDeliveryResponse(delivery=delivery_to_pb(row, attempts))


async def retry_delivery(
    resources: Resources, request: pb.RetryDeliveryRequest
) -> pb.RetryDeliveryResponse:
    """Make the delivery due at once and wake the dispatcher."""
    found = await resources.database.run(
        outbox.retry_delivery,
        request.webhook_id,
        require(request.delivery_id, "delivery_id", "delivery id"),
        time.time(),
    )
    if found is None:
        raise _not_found()
    resources.wake_dispatcher()
    row, attempts, requeued = found
    if requeued:
        # Counted once per time it is queued: a pending delivery made due sooner is not new.
        metrics.STATS.deliveries_queued += 1
    return pb.RetryDeliveryResponse(delivery=delivery_to_pb(row, attempts))


async def recover_webhook(
    resources: Resources, request: pb.RecoverWebhookRequest
) -> pb.RecoverWebhookResponse:
    """Queue every failed delivery created in the window to be sent again.

    The answer comes once they are all queued in the store, so an acknowledged recovery
    survives a crash; the dispatcher sends them afterwards.
    """
    now = time.time()
    errors = ErrorCollector()
    retention = resources.settings.retention_days * 86400
    start = end = now
    if not request.HasField("start_time"):
        errors.add("start_time", "The start of the time window is required.")
    else:
        start = valid_seconds(request.start_time, "start_time")
        if retention and start < now - retention:
            errors.add(
                "start_time",
                f"The window cannot start more than {resources.settings.retention_days:g} days "
                "ago; older deliveries are no longer kept.",
            )
    if request.HasField("end_time"):
        end = valid_seconds(request.end_time, "end_time")
    if request.HasField("start_time") and start > now:
        errors.add("start_time", "The start of the time window must not be in the future.")
    elif request.HasField("start_time") and end <= start:
        errors.add("end_time", "The end of the time window must be after its start.")
    errors.raise_if_any()

    recovery_id = new_id("rcv")
    total = await _requeue(resources, request.webhook_id, start, end, now)
    if total:
        log.info(
            "recovery %s queued %d deliveries of webhook %s", recovery_id, total, request.webhook_id
        )
    return pb.RecoverWebhookResponse(recovery_id=recovery_id, delivery_count=total)


async def _requeue(
    resources: Resources, webhook_id: str, start: float, end: float, failed_before: float
) -> int:
    """Queue the window's failed deliveries in batches; return how many were queued.

    Each batch commits on its own, so a call cut short (a deadline, a failing store) has
    queued part of the window and a second call queues the rest. Only what failed before
    the recovery began qualifies: a delivery that fails again meanwhile is not taken twice.
    """
    total = 0
    while True:
        queued = await resources.database.run(
            outbox.requeue_failed_batch,
            webhook_id,
            start,
            end,
            failed_before,
            time.time(),
            RECOVERY_BATCH_SIZE,
        )
        total += queued
        if queued:
            metrics.STATS.deliveries_queued += queued
            resources.wake_dispatcher()
        if queued < RECOVERY_BATCH_SIZE:
            return total
        # Let publishing and delivering have the store between batches.
        await asyncio.sleep(0)
