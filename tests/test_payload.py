"""Rendering of webhook bodies and the event-type catalog."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from datetime import UTC, datetime, timedelta, timezone
from urllib.parse import quote

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dembrane.webhooks.api import event_service
from dembrane.webhooks.domain import payload
from dembrane.webhooks.domain.errors import ErrorCollector, InvalidArgument
from dembrane.webhooks.domain.payload import (
    EVENT_TYPES,
    SUBSCRIBABLE_EVENT_TYPES,
    ConversationData,
    EventData,
    ProjectInfo,
    ReportData,
    canonical_json,
    event_type,
    render_body,
    test_event,
)

BASE = "https://dashboard.example.com"
PROJECT = ProjectInfo(id="p1", name="Café", language="nl")
WHEN = datetime(2026, 11, 28, 12, 0, 0, 123456, tzinfo=UTC)
CONVERSATION_KEYS = {
    "id",
    "created_at",
    "updated_at",
    "participant_name",
    "duration",
    "source",
    "is_finished",
    "is_all_chunks_transcribed",
    "tags",
    "emails_csv",
}

CONVERSATION = ConversationData(
    id="c1",
    created_at=datetime(2026, 11, 28, 11, 0, tzinfo=UTC),
    updated_at=None,
    participant_name="Ana",
    duration=61.5,
    source="PORTAL_AUDIO",
    is_finished=True,
    is_all_chunks_transcribed=True,
    tags=("a", "b"),
    emails_csv="ana@example.com",
    transcript="Hallo.",
    summary="A greeting.",
)


def _conversation_event(kind: str, **changes: object) -> EventData:
    fields: dict[str, object] = {
        "id": "evt_1",
        "type": kind,
        "project_id": "p1",
        "occurred_at": WHEN,
        "conversation": CONVERSATION,
    }
    fields.update(changes)
    return EventData(**fields)  # type: ignore[arg-type]


def _render(event: EventData) -> dict[str, object]:
    parsed: dict[str, object] = json.loads(render_body(event, PROJECT, BASE))
    return parsed


def test_canonical_json_gives_the_contracts_exact_bytes() -> None:
    """Keys sorted, no spaces and non-ASCII escaped, exactly as contract vector 3."""
    assert canonical_json(
        {
            "project": {"name": "Café", "language": "nl", "id": "p1"},
            "id": "evt_1",
            "event": "conversation.started",
        }
    ) == (
        b'{"event":"conversation.started","id":"evt_1","project":'
        b'{"id":"p1","language":"nl","name":"Caf\\u00e9"}}'
    )


def test_rendered_body_is_canonical() -> None:
    """The rendered body is its own canonical re-serialization, so legacy HMACs agree."""
    body = render_body(_conversation_event("conversation.summarized"), PROJECT, BASE)
    assert canonical_json(json.loads(body)) == body
    assert body.isascii()


# Strings with characters of every kind the canonical form treats apart: ASCII, controls,
# DEL, quotes and backslashes, non-ASCII of both planes, line separators, lone surrogates.
_ANY_TEXT = st.text(st.characters(max_codepoint=0x7F)) | st.text(
    st.characters(codec=None, exclude_categories=())
    | st.sampled_from(["\x00", "\x1f", "\x7f", '"', "\\", "/", "\u2028", "\udc80", "é"])
)
# The numbers a body carries: integers of any size, and durations as the body writes them.
_BODY_NUMBER = st.integers() | st.floats(allow_nan=False, allow_infinity=False).map(
    payload._json_number
)
_BODY_VALUE = st.recursive(
    st.none() | st.booleans() | _BODY_NUMBER | _ANY_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_ANY_TEXT, inner, max_size=4),
    max_leaves=24,
)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(_ANY_TEXT, _BODY_VALUE, max_size=8))
@example({"transcript": "rubout \x7f", "duration": 61.5})
@example({"big": 2**64, "small": -(2**63) - 1, "duration": 1e21})
def test_bodies_are_written_byte_for_byte_in_the_canonical_form(body: dict[str, object]) -> None:
    """The fast writer of bodies gives exactly the canonical form's bytes, whatever the
    strings, integers and durations in them."""
    assert payload._body_json(body) == canonical_json(body)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_duration_json_cannot_carry_is_refused(value: float) -> None:
    """NaN and the infinities never reach a body: writing one as a duration raises."""
    with pytest.raises(ValueError, match="not a number JSON can carry"):
        payload._json_number(value)


# The canonical re-serialization a JavaScript receiver would write (JSON.stringify with its
# keys sorted and non-ASCII escaped as Python escapes it).
_NODE_CANONICAL = """
const sort = (v) => Array.isArray(v) ? v.map(sort)
  : v && typeof v === "object"
    ? Object.fromEntries(Object.keys(v).sort().map((k) => [k, sort(v[k])])) : v;
let input = "";
process.stdin.on("data", (d) => (input += d));
process.stdin.on("end", () => process.stdout.write(JSON.stringify(sort(JSON.parse(input)))
  .replace(/[\\u0080-\\uffff]/g, (c) => "\\\\u" + c.charCodeAt(0).toString(16).padStart(4, "0"))));
"""


@pytest.mark.parametrize(
    ("duration", "expected"),
    [
        (60.0, "60"),
        (0.0, "0"),
        (61.5, "61.5"),
        (3600.25, "3600.25"),
        (None, "null"),
        (1e16, "10000000000000000"),
        (123456789012345678.0, "123456789012345680"),
        (-2.5e20, "-250000000000000000000"),
        (1e21, "1e+21"),
        (0.00001, "0"),
        (-0.0004, "0"),
        (0.01234, "0.012"),
        (12.3456789, "12.346"),
    ],
)
def test_rendered_body_re_serializes_to_itself_in_python_and_javascript(
    duration: float | None, expected: str
) -> None:
    """A duration is written to the millisecond, and a whole number without a fraction or
    exponent below 10^21 (60, not 60.0; 10000000000000000, not 1e+16), so a receiver that
    re-serializes the parsed body gets the signed bytes back in JavaScript (and Go, whose
    JSON writer agrees) as well as in Python."""
    conversation = dataclasses.replace(CONVERSATION, duration=duration)
    event = _conversation_event("conversation.summarized", conversation=conversation)
    body = render_body(event, PROJECT, BASE)
    assert canonical_json(json.loads(body)) == body
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed")
    rewritten = subprocess.run(  # noqa: S603 - a fixed script run by the local Node.js
        [node, "-e", _NODE_CANONICAL], input=body, capture_output=True, check=True, timeout=60
    ).stdout
    assert rewritten == body
    assert f'"duration":{expected},'.encode() in body


@pytest.mark.parametrize(
    ("kind", "extra"),
    [
        ("conversation.started", set()),
        ("conversation.transcribed", {"transcript"}),
        ("conversation.summarized", {"transcript", "summary"}),
        ("webhook.test", set()),
    ],
)
def test_conversation_keys_per_event_type(kind: str, extra: set[str]) -> None:
    """Transcript appears only for transcribed/summarized events and summary only for summarized."""
    body = _render(_conversation_event(kind))
    assert set(body) == {"id", "event", "timestamp", "project", "conversation", "dashboardUrl"}
    conversation = body["conversation"]
    assert isinstance(conversation, dict)
    assert set(conversation) == CONVERSATION_KEYS | extra


def test_conversation_body_values() -> None:
    """Top-level and conversation values render as the contract shows them."""
    body = _render(_conversation_event("conversation.summarized"))
    assert body["id"] == "evt_1"
    assert body["event"] == "conversation.summarized"
    assert body["timestamp"] == "2026-11-28T12:00:00.123456+00:00"
    assert body["project"] == {"id": "p1", "name": "Café", "language": "nl"}
    assert body["conversation"] == {
        "id": "c1",
        "created_at": "2026-11-28T11:00:00.000000+00:00",
        "updated_at": None,
        "participant_name": "Ana",
        "duration": 61.5,
        "source": "PORTAL_AUDIO",
        "is_finished": True,
        "is_all_chunks_transcribed": True,
        "tags": ["a", "b"],
        "emails_csv": "ana@example.com",
        "transcript": "Hallo.",
        "summary": "A greeting.",
    }


def test_timestamps_are_utc_whatever_zone_they_come_in() -> None:
    """Naive datetimes count as UTC and zoned ones are converted to UTC."""
    naive = _render(_conversation_event("conversation.started", occurred_at=datetime(2026, 1, 2)))
    assert naive["timestamp"] == "2026-01-02T00:00:00.000000+00:00"
    cet = timezone(timedelta(hours=1))
    zoned = _render(
        _conversation_event("conversation.started", occurred_at=datetime(2026, 1, 2, tzinfo=cet))
    )
    assert zoned["timestamp"] == "2026-01-01T23:00:00.000000+00:00"


# Protobuf timestamps span years 1 to 9999 in UTC; a zone a day away from either end would
# leave that range.
_EARLIEST, _LATEST = datetime(1, 1, 2), datetime(9999, 12, 30)
_ZONES = st.sampled_from(
    [None, UTC, timezone(timedelta(hours=1)), timezone(timedelta(hours=-9, minutes=-30))]
)


@settings(max_examples=300, deadline=None)
@given(
    st.datetimes(_EARLIEST, _LATEST, timezones=_ZONES),
    st.datetimes(_EARLIEST, _LATEST, timezones=_ZONES) | st.none(),
    st.sampled_from(["Plain", "Café"]),
)
@example(datetime(2026, 1, 2, 3, 4, 5), datetime(2026, 1, 2, 3, 4, 5, 1, tzinfo=UTC), "Plain")
@example(datetime(999, 1, 1, 0, 0, 0, 5, tzinfo=UTC), datetime(999, 12, 31, 23, 0, 0), "Plain")
def test_every_moment_is_written_in_utc_to_the_microsecond(
    occurred: datetime, created: datetime | None, name: str
) -> None:
    """Whatever its zone and whether or not it falls on a whole second, a moment in a body is
    its UTC time with six digits of fraction, on the fast writer's path (an ASCII project
    name) and on the canonical one's (a name that is not), and the body stays canonical."""

    def utc_text(moment: datetime) -> str:
        aware = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment
        return aware.astimezone(UTC).isoformat(timespec="microseconds")

    event = _conversation_event(
        "conversation.started",
        occurred_at=occurred,
        conversation=ConversationData(id="c1", created_at=created),
    )
    project = ProjectInfo(id="p1", name=name, language="nl")
    raw = render_body(event, project, BASE)
    body = json.loads(raw)
    assert body["timestamp"] == utc_text(occurred)
    assert body["conversation"]["created_at"] == (None if created is None else utc_text(created))
    assert canonical_json(body) == raw


_TYPES = st.sampled_from(
    [
        "conversation.started",
        "conversation.transcribed",
        "conversation.summarized",
        "report.generated",
    ]
)


@st.composite
def _any_event(draw: st.DrawFn) -> EventData:
    kind = draw(_TYPES)
    moment = st.datetimes(_EARLIEST, _LATEST, timezones=_ZONES)
    conversation = report = None
    if kind.startswith("conversation."):
        conversation = ConversationData(
            id=draw(_ANY_TEXT),
            created_at=draw(moment | st.none()),
            participant_name=draw(_ANY_TEXT | st.none()),
            duration=draw(st.floats(0, 1e7) | st.none()),
            tags=tuple(draw(st.lists(_ANY_TEXT, max_size=3))),
            transcript=draw(_ANY_TEXT | st.none()),
            summary=draw(_ANY_TEXT | st.none()),
        )
    else:
        report = ReportData(
            id=draw(_ANY_TEXT),
            status=draw(_ANY_TEXT),
            language=draw(st.sampled_from(["", "en", "nl"]) | _ANY_TEXT),
            date_created=draw(moment | st.none()),
        )
    return EventData(
        id=draw(_ANY_TEXT),
        type=kind,
        project_id=draw(_ANY_TEXT),
        occurred_at=draw(moment),
        conversation=conversation,
        report=report,
        dashboard_url=draw(st.none() | st.just("https://example.com/x")),
    )


@settings(max_examples=300, deadline=None)
@given(_any_event(), _ANY_TEXT, _ANY_TEXT | st.just(""))
def test_a_body_rendered_ahead_and_completed_is_the_body(
    event: EventData, name: str, language: str
) -> None:
    """A body rendered without its project and completed with it is byte for byte the body
    rendered at once, whatever the text in either; only a report without a language of its
    own, which takes its project's, is not rendered ahead."""
    project = ProjectInfo(id=event.project_id, name=name, language=language)
    parts = payload.body_parts(event, BASE)
    if event.report is not None and not event.report.language:
        assert parts is None
        return
    assert parts is not None
    assert payload.body_with(parts, project) == render_body(event, project, BASE)


def _report_event(language: str) -> EventData:
    return EventData(
        id="evt_2",
        type="report.generated",
        project_id="p1",
        occurred_at=WHEN,
        report=ReportData(id="r1", status="published", language=language, date_created=WHEN),
    )


def test_report_body() -> None:
    """A report.generated body carries the report object and no conversation."""
    body = _render(_report_event("nl"))
    assert "conversation" not in body
    assert body["report"] == {
        "id": "r1",
        "status": "published",
        "language": "nl",
        "date_created": "2026-11-28T12:00:00.123456+00:00",
    }
    assert body["dashboardUrl"] == f"{BASE}/projects/p1/report"


def test_a_report_without_a_language_takes_its_projects() -> None:
    """A report.generated event whose publisher left the language out carries the project's."""
    body = _render(_report_event(""))
    assert body["report"]["language"] == PROJECT.language != ""


def test_dashboard_url_defaults_to_the_conversation_page() -> None:
    """Without a publisher's link, the body links to the conversation's overview."""
    body = _render(_conversation_event("conversation.started"))
    assert body["dashboardUrl"] == f"{BASE}/projects/p1/conversation/c1/overview"


def test_dashboard_url_escapes_the_ids_it_is_built_from() -> None:
    """Ids with spaces, slashes, '?' or '#' stay inside their own path segment of the link."""
    conversation = dataclasses.replace(CONVERSATION, id="conv 1/2?x#y")
    event = dataclasses.replace(
        _conversation_event("conversation.started", conversation=conversation),
        project_id="p x/y",
    )
    body = _render(event)
    assert body["dashboardUrl"] == (
        f"{BASE}/projects/p%20x%2Fy/conversation/conv%201%2F2%3Fx%23y/overview"
    )


def test_a_lone_surrogate_in_an_id_is_escaped_not_an_error() -> None:
    """An id holding a lone surrogate (no UTF-8 text does, so no gRPC call carries one, but a
    ``str`` can) still gives a body, the surrogate escaped as the bytes ``surrogatepass``
    gives it, the same whether the body is rendered at once or ahead."""
    conversation = dataclasses.replace(CONVERSATION, id="c\ud800")
    event = dataclasses.replace(
        _conversation_event("conversation.started", conversation=conversation),
        project_id="\udc80",
    )
    body = _render(event)
    assert body["dashboardUrl"] == (f"{BASE}/projects/%ED%B2%80/conversation/c%ED%A0%80/overview")
    parts = payload.body_parts(event, BASE)
    assert parts is not None
    assert payload.body_with(parts, PROJECT) == render_body(event, PROJECT, BASE)


@pytest.mark.parametrize(
    "identifier",
    ["c1", "A-z_0.9~", "", "conv 1", "a/b", "caf\u00e9", "x\ny", "100%", "..", "\u20ac~"],
)
def test_ids_in_the_link_are_escaped_as_url_quoting_escapes_them(identifier: str) -> None:
    """Ids that need no escaping go into the link as they are, and every other one as
    ``urllib.parse.quote`` escapes it: the quick path changes no link."""
    conversation = dataclasses.replace(CONVERSATION, id=identifier)
    event = _conversation_event("conversation.started", conversation=conversation)
    body = _render(event)
    assert body["dashboardUrl"] == (
        f"{BASE}/projects/p1/conversation/{quote(identifier, safe='')}/overview"
    )


def test_dashboard_url_base_tolerates_a_trailing_slash() -> None:
    """A base URL with a trailing slash does not double the slash."""
    body = json.loads(render_body(_conversation_event("conversation.started"), PROJECT, BASE + "/"))
    assert body["dashboardUrl"] == f"{BASE}/projects/p1/conversation/c1/overview"


def test_dashboard_url_given_by_the_publisher_wins() -> None:
    """A link given with the event is sent as is."""
    link = "https://app.example.org/somewhere?x=1"
    body = _render(_conversation_event("conversation.started", dashboard_url=link))
    assert body["dashboardUrl"] == link


def test_dashboard_url_falls_back_to_the_project_overview() -> None:
    """An event without a subject links to its project's overview."""
    event = EventData(id="evt_3", type="project.touched", project_id="p1", occurred_at=WHEN)
    assert _render(event)["dashboardUrl"] == f"{BASE}/projects/p1/overview"


@pytest.mark.parametrize(
    ("kind", "field"),
    [("conversation.started", "conversation"), ("report.generated", "report")],
)
def test_missing_subject_is_refused(kind: str, field: str) -> None:
    """A conversation event without a conversation, or a report event without a report, fails."""
    event = EventData(id="evt_4", type=kind, project_id="p1", occurred_at=WHEN)
    with pytest.raises(InvalidArgument) as caught:
        render_body(event, PROJECT, BASE)
    assert caught.value.violations[0].field == field


def test_test_event_is_a_fresh_mock_conversation() -> None:
    """The Test action's event is webhook.test with a mock conversation and a fresh id."""
    event = test_event(PROJECT, WHEN)
    assert event.type == "webhook.test"
    assert event.id.startswith("evt_test_")
    assert event.id != test_event(PROJECT, WHEN).id
    assert event.project_id == "p1"
    assert event.occurred_at == WHEN
    body = _render(event)
    conversation = body["conversation"]
    assert isinstance(conversation, dict)
    assert set(conversation) == CONVERSATION_KEYS


def test_catalog_lists_the_five_types_and_which_are_subscribable() -> None:
    """The catalog has the contract's five types; all but webhook.test are subscribable."""
    assert [info.name for info in EVENT_TYPES] == [
        "conversation.started",
        "conversation.transcribed",
        "conversation.summarized",
        "report.generated",
        "webhook.test",
    ]
    assert {
        "conversation.started",
        "conversation.transcribed",
        "conversation.summarized",
        "report.generated",
    } == SUBSCRIBABLE_EVENT_TYPES
    for info in EVENT_TYPES:
        assert info.description.endswith(".")
        assert event_type(info.name) is info
    assert event_type("conversation.deleted") is None


@pytest.mark.parametrize("info", EVENT_TYPES, ids=lambda info: info.name)
def test_catalog_examples_are_bodies_of_their_type(info: object) -> None:
    """Each example is a canonical body of its own type with the subject keys that type has."""
    from dembrane.webhooks.domain.payload import EventTypeInfo

    assert isinstance(info, EventTypeInfo)
    example = info.example
    assert example["event"] == info.name
    assert json.loads(canonical_json(example)) == example
    assert {"id", "event", "timestamp", "project", "dashboardUrl"} <= set(example)
    if info.name == "report.generated":
        assert set(example["report"]) == {"id", "status", "language", "date_created"}
        assert "conversation" not in example
    else:
        keys = set(example["conversation"])
        assert keys >= CONVERSATION_KEYS
        assert ("transcript" in keys) == (
            info.name in {"conversation.transcribed", "conversation.summarized"}
        )
        assert ("summary" in keys) == (info.name == "conversation.summarized")


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [
        (-62_135_596_800, 0),
        (0, 0),
        (1_764_331_200, 123_456_789),
        (-1, 999_999_999),
        (253_402_300_799, 999_999_999),
    ],
)
def test_event_times_are_read_as_protobuf_reads_them(seconds: int, nanos: int) -> None:
    """A publish call's timestamps become the same UTC datetimes ``Timestamp.ToDatetime``
    gives, to the microsecond, across the whole range a Timestamp allows."""
    stamp = Timestamp(seconds=seconds, nanos=nanos)
    errors = ErrorCollector()
    assert event_service._time(stamp, "occur_time", errors) == stamp.ToDatetime(tzinfo=UTC)
    assert not errors.violations
