"""The body a receiver gets, and the catalog of event types.

Rendering is pure: the same event always yields the same bytes. Bodies are canonical JSON
(keys sorted, no spaces, non-ASCII escaped) so that a receiver that parses the body and
re-serializes it before computing the HMAC arrives at the very bytes that were signed.
"""

from __future__ import annotations

import functools
import json
import math
import re
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import quote

import orjson

from dembrane.webhooks.domain.errors import InvalidArgument

__all__ = [
    "EVENT_TYPES",
    "SUBSCRIBABLE_EVENT_TYPES",
    "BodyParts",
    "ConversationData",
    "EventData",
    "EventTypeInfo",
    "ProjectInfo",
    "ReportData",
    "body_of",
    "body_parts",
    "body_with",
    "canonical_json",
    "dashboard_url",
    "event_type",
    "parts_ahead",
    "render_body",
    "test_event",
]

CONVERSATION_STARTED = "conversation.started"
CONVERSATION_TRANSCRIBED = "conversation.transcribed"
CONVERSATION_SUMMARIZED = "conversation.summarized"
REPORT_GENERATED = "report.generated"
WEBHOOK_TEST = "webhook.test"

# Events whose body carries the transcript, and those that also carry the summary.
_WITH_TRANSCRIPT = frozenset({CONVERSATION_TRANSCRIBED, CONVERSATION_SUMMARIZED})
_WITH_SUMMARY = frozenset({CONVERSATION_SUMMARIZED})


def canonical_json(obj: object) -> bytes:
    """Serialize ``obj`` as canonical JSON: sorted keys, no spaces, ASCII only.

    A ``datetime`` is written as ``isoformat(timespec="microseconds")``. NaN and the
    infinities, which JSON cannot express, raise ``ValueError``.
    """
    return json.dumps(
        obj,
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
        allow_nan=False,
        default=_datetime_text,
    ).encode()


def _datetime_text(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat(timespec="microseconds")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _body_json(body: dict[str, Any]) -> bytes:
    """``canonical_json(body)``, for a body whose floats are as ``_json_number`` makes them.

    orjson writes the same bytes in a tenth of the time: sorted keys, no spaces, the same
    escapes, and the same shortest digits for any finite float of at least a ten-thousandth
    (below that it writes plain digits where the canonical form has an exponent, and
    ``_json_number`` rounds those to 0). It writes non-ASCII characters and DEL as they are,
    where the canonical form escapes them, and refuses integers beyond 64 bits and lone
    surrogates: bodies with any of those go the standard way.
    """
    try:
        encoded = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # orjson.JSONEncodeError
        return canonical_json(body)
    if not encoded.isascii() or b"\x7f" in encoded:
        return canonical_json(body)
    return encoded


@dataclass(frozen=True)
class ProjectInfo:
    """The project an event belongs to, as the directory knows it."""

    id: str
    name: str
    language: str


@dataclass(slots=True)
class ConversationData:
    """The conversation an event is about, with the fields the body shows.

    Not frozen, though nothing changes one: made for every event published, on the event
    loop, and a frozen dataclass's constructor takes twice as long (as for ``EventData``).
    """

    id: str
    created_at: datetime | None = None
    updated_at: datetime | None = None
    participant_name: str | None = None
    duration: float | None = None
    source: str | None = None
    is_finished: bool = False
    is_all_chunks_transcribed: bool = False
    tags: tuple[str, ...] = ()
    emails_csv: str | None = None
    transcript: str | None = None
    summary: str | None = None


@dataclass(frozen=True)
class ReportData:
    """The report a ``report.generated`` event is about."""

    id: str
    status: str
    language: str
    date_created: datetime | None = None


@dataclass(frozen=True, slots=True)
class BodyParts:
    """An event's body without its project object, rendered ahead (see ``body_parts``)."""

    #: The dashboard base URL the parts were rendered with.
    dashboard_base_url: str
    #: The canonical JSON object of the body's keys that sort before ``project``.
    before: bytes
    #: The canonical JSON object of those that sort after it.
    after: bytes


@dataclass(slots=True)
class EventData:
    """One event as published: what happened, where, when, and to what (not frozen, as
    ``ConversationData`` is not)."""

    id: str
    type: str
    project_id: str
    occurred_at: datetime
    conversation: ConversationData | None = None
    report: ReportData | None = None
    dashboard_url: str | None = None
    #: The body rendered ahead of the transaction, all but the project (``body_parts``).
    parts: BodyParts | None = field(default=None, compare=False, repr=False)


def _iso(moment: datetime) -> datetime | str:
    """``moment`` in UTC, for a body: written as ``isoformat(timespec="microseconds")``.

    A fixed precision keeps every timestamp the same shape, even at a whole second. orjson
    writes an aware UTC datetime with a fraction in exactly that form, in a tenth of the
    time (three per event add up on the store's thread), so such a moment stays a
    ``datetime`` for the encoder; one at a whole second orjson would write without its
    fraction, so that one goes as text, formatted directly (half the time of ``isoformat``
    on an aware datetime). ``canonical_json`` writes both the same way.
    """
    # Publishers sometimes hand over naive datetimes; the platform keeps time in UTC.
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    elif moment.tzinfo is not UTC:
        moment = moment.astimezone(UTC)
    if moment.microsecond:
        return moment
    return _WHOLE_SECOND % (
        moment.year,
        moment.month,
        moment.day,
        moment.hour,
        moment.minute,
        moment.second,
    )


#: A UTC moment at a whole second, as ``isoformat(timespec="microseconds")`` writes it.
_WHOLE_SECOND = "%04d-%02d-%02dT%02d:%02d:%02d.000000+00:00"


def _iso_or_none(moment: datetime | None) -> datetime | str | None:
    return None if moment is None else _iso(moment)


def _needs_conversation(event_type: str) -> bool:
    return event_type == WEBHOOK_TEST or event_type.startswith("conversation.")


def _json_number(value: float | None) -> float | int | None:
    """``value`` (seconds) as the body carries it: to the millisecond, and a whole number
    below 10^21 in plain digits without a fraction (``60``, not ``60.0``;
    ``10000000000000000``, not ``1e+16``), as JavaScript's and Go's JSON writers put it.
    A receiver that re-serializes the parsed body to check the signature then gets the
    bytes that were signed, whichever of the three languages it is written in. Below a
    ten-thousandth the three write a number differently (``1e-05`` in Python, ``0.00001``
    in JavaScript and Go), which the rounding rules out. NaN and the infinities, which JSON
    cannot carry, raise ``ValueError``."""
    if value is None:
        return None
    if not math.isfinite(value):
        raise ValueError(f"{value} is not a number JSON can carry")
    value = round(value, 3)
    if not value.is_integer():
        return value
    if abs(value) < 2**53:
        return int(value)
    if abs(value) < 1e21:
        # The shortest digits that read back as ``value``, padded with zeros, as JavaScript
        # writes them (the float's exact value may have other trailing digits).
        return int(Decimal(repr(value)))
    return value


def _needs_report(event_type: str) -> bool:
    return event_type.startswith("report.")


def _conversation_object(event_type: str, conversation: ConversationData) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": conversation.id,
        "created_at": _iso_or_none(conversation.created_at),
        "updated_at": _iso_or_none(conversation.updated_at),
        "participant_name": conversation.participant_name,
        "duration": _json_number(conversation.duration),
        "source": conversation.source,
        "is_finished": conversation.is_finished,
        "is_all_chunks_transcribed": conversation.is_all_chunks_transcribed,
        "tags": list(conversation.tags),
        "emails_csv": conversation.emails_csv,
    }
    if event_type in _WITH_TRANSCRIPT:
        body["transcript"] = conversation.transcript
    if event_type in _WITH_SUMMARY:
        body["summary"] = conversation.summary
    return body


def _report_object(report: ReportData, project_language: str) -> dict[str, Any]:
    return {
        "id": report.id,
        "status": report.status,
        # A report is written in its project's language unless the publisher says otherwise.
        "language": report.language or project_language,
        "date_created": _iso_or_none(report.date_created),
    }


#: Whether a string is all characters that ``quote`` leaves as they are (letters, digits and
#: ``_.-~``): most ids are, and checking costs a tenth of quoting them.
_UNRESERVED = re.compile(r"[A-Za-z0-9_.~-]*").fullmatch


def _segment(value: str) -> str:
    """``value`` as one path segment: escaped wherever it would end or leave one.

    A lone surrogate (which no UTF-8 text holds, so no gRPC call carries, but a ``str``
    can) is escaped as the three bytes Python's ``surrogatepass`` gives it rather than
    failing the whole body.
    """
    return value if _UNRESERVED(value) else quote(value, safe="", errors="surrogatepass")


def dashboard_url(event: EventData, dashboard_base_url: str) -> str:
    """The link of the body: the publisher's, else the dashboard page of the subject."""
    if event.dashboard_url:
        return event.dashboard_url
    base = dashboard_base_url.rstrip("/")
    # Ids are path segments: any character that would end or leave one is escaped.
    project = f"{base}/projects/{_segment(event.project_id)}"
    if event.conversation is not None:
        return f"{project}/conversation/{_segment(event.conversation.id)}/overview"
    if event.report is not None:
        return f"{project}/report"
    return f"{project}/overview"


def _subject_fields(
    event: EventData, project_language: str, dashboard_base_url: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The keys of ``event``'s body that sort before ``project`` and those that sort after it;
    raises as ``render_body`` does."""
    before: dict[str, Any] = {
        "id": event.id,
        "event": event.type,
        "dashboardUrl": dashboard_url(event, dashboard_base_url),
    }
    after: dict[str, Any] = {"timestamp": _iso(event.occurred_at)}
    if event.conversation is not None:
        before["conversation"] = _conversation_object(event.type, event.conversation)
    elif _needs_conversation(event.type):
        raise InvalidArgument.for_field(
            "conversation", f"A {event.type} event needs a conversation."
        )
    if event.report is not None:
        after["report"] = _report_object(event.report, project_language)
    elif _needs_report(event.type):
        raise InvalidArgument.for_field("report", f"A {event.type} event needs a report.")
    return before, after


def render_body(event: EventData, project: ProjectInfo, dashboard_base_url: str) -> bytes:
    """The canonical JSON body of ``event``, exactly as it is signed and sent.

    Raises ``InvalidArgument`` when a conversation event lacks its conversation or a report
    event its report, so rendering once at publish time rejects such an event up front.
    """
    body, after = _subject_fields(event, project.language, dashboard_base_url)
    body["project"] = {"id": project.id, "name": project.name, "language": project.language}
    body.update(after)
    return _body_json(body)


def body_parts(event: EventData, dashboard_base_url: str) -> BodyParts | None:
    """``event``'s body rendered without its project, to be completed by ``body_with``.

    The project's name and language are known only inside the publishing transaction, which
    runs on the store's one thread; everything else can be rendered before, on the event
    loop. Canonical JSON is the concatenation of each key's part in key order, so the body
    is the keys before ``"project"``, the project's object, and the keys after it. None for
    a report without a language of its own, which takes its project's. Raises as
    ``render_body`` does.
    """
    if event.report is not None and not event.report.language:
        return None
    before, after = _subject_fields(event, "", dashboard_base_url)
    return BodyParts(dashboard_base_url, _body_json(before), _body_json(after))


def body_with(parts: BodyParts, project: ProjectInfo) -> bytes:
    """The body ``parts`` (never empty: ``id`` comes before the project and ``timestamp``
    after it) complete with ``project``: the bytes ``render_body`` gives."""
    return b"".join(
        (parts.before[:-1], b',"project":', _project_json(project), b",", parts.after[1:])
    )


def parts_ahead(event: EventData, dashboard_base_url: str) -> BodyParts | None:
    """``event``'s parts rendered ahead, if they were rendered for ``dashboard_base_url``."""
    parts = event.parts
    if parts is not None and parts.dashboard_base_url == dashboard_base_url:
        return parts
    return None


def body_of(event: EventData, project: ProjectInfo, dashboard_base_url: str) -> bytes:
    """``render_body``'s bytes: from the parts rendered ahead when they fit, so only the
    project's object is left to add, else rendered whole."""
    parts = parts_ahead(event, dashboard_base_url)
    if parts is not None:
        return body_with(parts, project)
    return render_body(event, project, dashboard_base_url)


@functools.lru_cache(maxsize=4096)
def _project_json(project: ProjectInfo) -> bytes:
    return _body_json({"id": project.id, "name": project.name, "language": project.language})


def _mock_conversation(now: datetime, conversation_id: str) -> ConversationData:
    return ConversationData(
        id=conversation_id,
        created_at=now - timedelta(minutes=12),
        updated_at=now,
        participant_name="Test participant",
        duration=687.5,
        source="PORTAL_AUDIO",
        is_finished=True,
        is_all_chunks_transcribed=True,
        tags=("test",),
        emails_csv=None,
    )


def test_event(project: ProjectInfo, now: datetime) -> EventData:
    """The ``webhook.test`` event the Test action sends: a mock conversation of ``project``."""
    # Each test gets fresh ids so a receiver that deduplicates on them still sees it.
    suffix = secrets.token_hex(8)
    return EventData(
        id=f"evt_test_{suffix}",
        type=WEBHOOK_TEST,
        project_id=project.id,
        occurred_at=now,
        conversation=_mock_conversation(now, f"conv_test_{suffix}"),
    )


# The pytest collector would take ``test_event`` for a test; it is product code.
test_event.__test__ = False  # type: ignore[attr-defined]


@dataclass(frozen=True)
class EventTypeInfo:
    """One entry of the catalog: a type's name, what it means and an example body."""

    name: str
    description: str
    #: Whether a webhook may subscribe to it; ``webhook.test`` is only sent by the Test action.
    subscribable: bool
    #: The parsed body of an example event of this type, exactly as ``render_body`` makes it.
    example: dict[str, Any]


_EXAMPLE_PROJECT = ProjectInfo(id="proj_3f9a1c", name="Citizen panel Utrecht", language="nl")
_EXAMPLE_BASE_URL = "https://dashboard.dembrane.com"
_EXAMPLE_TIME = datetime(2026, 11, 28, 12, 0, 0, 123456, tzinfo=UTC)
_EXAMPLE_TRANSCRIPT = (
    "Host: What would make the neighbourhood greener?\n"
    "Participant: More trees along the canal, and a community garden near the school."
)
_EXAMPLE_SUMMARY = (
    "The participant wants more trees along the canal and a community garden near the school."
)


def _example_conversation(with_text: bool) -> ConversationData:
    return ConversationData(
        id="conv_8d2e47",
        created_at=_EXAMPLE_TIME - timedelta(minutes=14),
        updated_at=_EXAMPLE_TIME,
        participant_name="Table 4",
        duration=812.4,
        source="PORTAL_AUDIO",
        is_finished=with_text,
        is_all_chunks_transcribed=with_text,
        tags=("green spaces", "mobility"),
        emails_csv=None,
        transcript=_EXAMPLE_TRANSCRIPT if with_text else None,
        summary=_EXAMPLE_SUMMARY if with_text else None,
    )


def _example(
    event_type: str,
    *,
    conversation: ConversationData | None = None,
    report: ReportData | None = None,
) -> dict[str, Any]:
    event = EventData(
        id=f"evt_example_{event_type.replace('.', '_')}",
        type=event_type,
        project_id=_EXAMPLE_PROJECT.id,
        occurred_at=_EXAMPLE_TIME,
        conversation=conversation,
        report=report,
    )
    parsed: dict[str, Any] = json.loads(render_body(event, _EXAMPLE_PROJECT, _EXAMPLE_BASE_URL))
    return parsed


EVENT_TYPES: tuple[EventTypeInfo, ...] = (
    EventTypeInfo(
        name=CONVERSATION_STARTED,
        description="A participant or host began a conversation.",
        subscribable=True,
        example=_example(CONVERSATION_STARTED, conversation=_example_conversation(False)),
    ),
    EventTypeInfo(
        name=CONVERSATION_TRANSCRIBED,
        description=(
            "All of a conversation's audio is transcribed; the body carries the transcript."
        ),
        subscribable=True,
        example=_example(CONVERSATION_TRANSCRIBED, conversation=_example_conversation(True)),
    ),
    EventTypeInfo(
        name=CONVERSATION_SUMMARIZED,
        description=(
            "The conversation's summary is saved; the body carries the transcript and the summary."
        ),
        subscribable=True,
        example=_example(CONVERSATION_SUMMARIZED, conversation=_example_conversation(True)),
    ),
    EventTypeInfo(
        name=REPORT_GENERATED,
        description="A project report finished generating.",
        subscribable=True,
        example=_example(
            REPORT_GENERATED,
            report=ReportData(
                id="rep_51b0e9", status="published", language="nl", date_created=_EXAMPLE_TIME
            ),
        ),
    ),
    EventTypeInfo(
        name=WEBHOOK_TEST,
        description=(
            "Sent only by the Test action, never by publishing, with a mock conversation."
        ),
        subscribable=False,
        example=_example(
            WEBHOOK_TEST, conversation=_mock_conversation(_EXAMPLE_TIME, "conv_test_0f3c9a")
        ),
    ),
)

SUBSCRIBABLE_EVENT_TYPES: frozenset[str] = frozenset(
    info.name for info in EVENT_TYPES if info.subscribable
)

_BY_NAME: dict[str, EventTypeInfo] = {info.name: info for info in EVENT_TYPES}


def event_type(name: str) -> EventTypeInfo | None:
    """The catalog entry called ``name``, or None when there is no such type."""
    return _BY_NAME.get(name)
