"""EventService: backend services publish events; the call returns once they are stored.

A call is validated whole (every bad field of every event is reported at once), then the
events and their deliveries are written in one transaction (shared with calls that arrive at
the same moment, see ``store.publish_queue``), and only after that commit is the dispatcher
woken and the call answered: an acknowledged event is never lost.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from dembrane.webhooks import metrics
from dembrane.webhooks.api.directory_service import LANGUAGE_MAX, NAME_MAX
from dembrane.webhooks.config import Settings
from dembrane.webhooks.domain.errors import ErrorCollector
from dembrane.webhooks.domain.ids import new_id
from dembrane.webhooks.domain.payload import (
    SUBSCRIBABLE_EVENT_TYPES,
    ConversationData,
    EventData,
    ProjectInfo,
    ReportData,
    render_body,
)
from dembrane.webhooks.domain.text import has_control_characters
from dembrane.webhooks.resources import Resources
from dembrane.webhooks.store import directory, outbox
from dembrane.webhooks.store.database import Database
from dembrane.webhooks.store.publish_queue import PublishQueue
from dembrane.webhooks.v1 import event_pb2, event_service_pb2_grpc
from dembrane.webhooks.v1 import event_service_pb2 as pb

__all__ = ["MAX_BATCH", "EventServicer", "event_from_pb"]

Context = grpc.aio.ServicerContext[object, object]

#: The most events one PublishEvents call may carry.
MAX_BATCH = 500
ID_MAX = 128
URL_MAX = 2048
_ID_PATTERN = re.compile(r"[A-Za-z0-9_.:\-]+")
_KNOWN_TYPES = ", ".join(sorted(SUBSCRIBABLE_EVENT_TYPES))
#: JSON escaping turns one byte of a string into at most six (``\u00XX``); the keys, times
#: and the dashboard link add less than this to a body.
_JSON_GROWTH = 6
_BODY_OVERHEAD = 16 * 1024
#: The most a project's name and language can add to a body: each character escaped as a
#: surrogate pair (12 bytes), the language twice (a report falls back to it).
_PROJECT_ROOM = 12 * (NAME_MAX + 2 * LANGUAGE_MAX)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# google.protobuf.Timestamp's range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
_SECONDS_MIN = -62_135_596_800
_SECONDS_MAX = 253_402_300_799


def _time(ts: Timestamp, field: str, errors: ErrorCollector) -> datetime | None:
    """The UTC time ``ts`` names, to the microsecond (what ``Timestamp.ToDatetime`` gives,
    without its detour through a time-zone conversion: three of these come with each event).
    """
    seconds, nanos = ts.seconds, ts.nanos
    if not (_SECONDS_MIN <= seconds <= _SECONDS_MAX and 0 <= nanos < 1_000_000_000):
        errors.add(field, f"The {field} is not a valid time.")
        return None
    return _EPOCH + timedelta(seconds=seconds, microseconds=nanos // 1000)


def _conversation(
    message: event_pb2.Conversation, field: str, errors: ErrorCollector
) -> ConversationData:
    if not message.id.strip():
        errors.add(f"{field}.id", "The conversation id is required.")

    def text_or_none(present: bool, value: str) -> str | None:
        return value if present else None

    duration = message.duration if message.HasField("duration") else None
    if duration is not None and not (math.isfinite(duration) and duration >= 0):
        # JSON has no NaN or infinity: the body would not parse at the receiver.
        errors.add(f"{field}.duration", "The duration must be a finite number of seconds, >= 0.")

    return ConversationData(
        id=message.id,
        created_at=(
            _time(message.created_at, f"{field}.created_at", errors)
            if message.HasField("created_at")
            else None
        ),
        updated_at=(
            _time(message.updated_at, f"{field}.updated_at", errors)
            if message.HasField("updated_at")
            else None
        ),
        participant_name=text_or_none(
            message.HasField("participant_name"), message.participant_name
        ),
        duration=duration,
        source=text_or_none(message.HasField("source"), message.source),
        is_finished=message.is_finished,
        is_all_chunks_transcribed=message.is_all_chunks_transcribed,
        tags=tuple(message.tags),
        emails_csv=text_or_none(message.HasField("emails_csv"), message.emails_csv),
        transcript=text_or_none(message.HasField("transcript"), message.transcript),
        summary=text_or_none(message.HasField("summary"), message.summary),
    )


def _report(message: event_pb2.Report, field: str, errors: ErrorCollector) -> ReportData:
    if not message.id.strip():
        errors.add(f"{field}.id", "The report id is required.")
    created = (
        _time(message.date_created, f"{field}.date_created", errors)
        if message.HasField("date_created")
        else None
    )
    return ReportData(
        id=message.id, status=message.status, language=message.language, date_created=created
    )


def event_from_pb(
    message: event_pb2.Event, field: str, now: datetime, errors: ErrorCollector
) -> EventData:
    """The event a message describes; problems go to ``errors`` under ``field``'s name.

    An empty id gets a fresh ``evt_`` id and a missing occurrence time is ``now``.
    """
    event_id = message.id.strip()
    if not event_id:
        event_id = new_id("evt")
    elif len(event_id) > ID_MAX or not _ID_PATTERN.fullmatch(event_id):
        errors.add(
            f"{field}.id",
            f"The event id must be 1 to {ID_MAX} letters, digits, '_', '-', '.' or ':'.",
        )

    event_type = message.type.strip()
    if not event_type:
        errors.add(f"{field}.type", f"The event type is required; one of {_KNOWN_TYPES}.")
    elif event_type == "webhook.test":
        errors.add(
            f"{field}.type",
            "webhook.test events are sent only by the Test action and cannot be published.",
        )
    elif event_type not in SUBSCRIBABLE_EVENT_TYPES:
        errors.add(
            f"{field}.type",
            f"The event type {event_type!r} is unknown; the known types are {_KNOWN_TYPES}.",
        )

    project_id = message.project_id.strip()
    if not project_id:
        errors.add(f"{field}.project_id", "The project id is required.")
    elif len(project_id) > ID_MAX:
        errors.add(f"{field}.project_id", f"The project id must be at most {ID_MAX} characters.")
    elif has_control_characters(project_id):
        errors.add(f"{field}.project_id", "The project id must not contain control characters.")

    occurred = now
    if message.HasField("occur_time"):
        occurred = _time(message.occur_time, f"{field}.occur_time", errors) or now

    conversation: ConversationData | None = None
    report: ReportData | None = None
    subject = message.WhichOneof("subject")
    if subject == "conversation":
        conversation = _conversation(message.conversation, f"{field}.conversation", errors)
    elif subject == "report":
        report = _report(message.report, f"{field}.report", errors)
    if event_type.startswith("conversation.") and subject != "conversation":
        errors.add(f"{field}.conversation", f"A {event_type} event needs a conversation.")
    elif event_type.startswith("report.") and subject != "report":
        errors.add(f"{field}.report", f"A {event_type} event needs a report.")

    dashboard_url = message.dashboard_url.strip() or None
    if dashboard_url is not None and (
        len(dashboard_url) > URL_MAX or not dashboard_url.startswith(("http://", "https://"))
    ):
        errors.add(
            f"{field}.dashboard_url",
            f"The dashboard URL must be an http or https URL of at most {URL_MAX} characters.",
        )

    return EventData(
        id=event_id,
        type=event_type,
        project_id=project_id,
        occurred_at=occurred,
        conversation=conversation,
        report=report,
        dashboard_url=dashboard_url,
    )


async def _check_sizes(
    messages: Sequence[event_pb2.Event],
    events: Sequence[EventData],
    fields: Sequence[str],
    settings: Settings,
    database: Database,
    errors: ErrorCollector,
) -> None:
    """Refuse the call when an event's body would be larger than ``max_event_bytes``.

    The body is rendered only for an event whose encoded size could reach the limit, first
    without its project's name and language; only when those could still tip it over the
    limit is the project read, so a call of ordinary events costs no extra read.
    """
    limit = settings.max_event_bytes
    for message, event, field in zip(messages, events, fields, strict=True):
        if message.ByteSize() * _JSON_GROWTH + _BODY_OVERHEAD <= limit:
            continue
        project = ProjectInfo(id=event.project_id, name="", language="")
        size = len(render_body(event, project, settings.dashboard_base_url))
        if size <= limit < size + _PROJECT_ROOM:
            known = await database.run(directory.project_info, event.project_id)
            # An unknown project fails the call further on, with its own sentence.
            if known is not None:
                size = len(render_body(event, known, settings.dashboard_base_url))
        if size > limit:
            errors.add(
                field,
                f"The event's body would be {size:,} bytes; the most an event may have is "
                f"{limit:,} bytes (WEBHOOKS_MAX_EVENT_BYTES).",
            )
    errors.raise_if_any()


def _result_pb(outcome: outbox.PublishOutcome) -> pb.PublishResult:
    return pb.PublishResult(
        event_id=outcome.event_id,
        duplicate=outcome.duplicate,
        delivery_count=outcome.delivery_count,
        skip_reason=outcome.skip_reason,
    )


class EventServicer(event_service_pb2_grpc.EventServiceServicer):
    """Publishing: validation, one transaction, then a wake-up for the dispatcher."""

    def __init__(self, resources: Resources) -> None:
        self._settings = resources.settings
        self._db = resources.database
        self._queue = PublishQueue(
            resources.database,
            resources.settings.dashboard_base_url,
            resources.wake_dispatcher,
            claimer=lambda: resources.claimer,
        )

    async def _publish(self, events: Sequence[EventData]) -> list[outbox.PublishOutcome]:
        outcomes = await self._queue.publish(events)
        fresh = [o for o in outcomes if not o.duplicate]
        stats = metrics.STATS
        stats.events_published += len(fresh)
        stats.deliveries_queued += sum(o.delivery_count for o in fresh)
        stats.finished["skipped"] += sum(o.skipped_count for o in fresh)
        stats.finished["failed"] += sum(o.failed_count for o in fresh)
        return outcomes

    async def PublishEvent(
        self, request: pb.PublishEventRequest, context: Context
    ) -> pb.PublishEventResponse:
        errors = ErrorCollector()
        if not request.HasField("event"):
            errors.add("event", "The event is required.")
            errors.raise_if_any()
        event = event_from_pb(request.event, "event", datetime.now(UTC), errors)
        errors.raise_if_any()
        await _check_sizes([request.event], [event], ["event"], self._settings, self._db, errors)
        (outcome,) = await self._publish([event])
        return pb.PublishEventResponse(result=_result_pb(outcome))

    async def PublishEvents(
        self, request: pb.PublishEventsRequest, context: Context
    ) -> pb.PublishEventsResponse:
        errors = ErrorCollector()
        count = len(request.events)
        if not 1 <= count <= MAX_BATCH:
            errors.add("events", f"A call publishes 1 to {MAX_BATCH} events; this one has {count}.")
            errors.raise_if_any()
        now = datetime.now(UTC)
        fields = [f"events[{index}]" for index in range(count)]
        events = [
            event_from_pb(message, field, now, errors)
            for message, field in zip(request.events, fields, strict=True)
        ]
        errors.raise_if_any()
        await _check_sizes(request.events, events, fields, self._settings, self._db, errors)
        outcomes = await self._publish(events)
        return pb.PublishEventsResponse(results=[_result_pb(o) for o in outcomes])
