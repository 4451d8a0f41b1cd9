"""Publishing events: validation, idempotency, fan-out to subscribed webhooks, tier rules.

Events go through the real gRPC EventService of a running service and reach real receivers
on loopback that verify every signature.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2
from sqlmodel import Session

from dembrane.webhooks.api.event_service import event_from_pb
from dembrane.webhooks.auth import SCOPE_DIRECTORY, SCOPE_PUBLISH
from dembrane.webhooks.config import DEFAULT_MAX_EVENT_BYTES, Settings
from dembrane.webhooks.domain.access import Tier
from dembrane.webhooks.domain.errors import ErrorCollector, FailedPrecondition
from dembrane.webhooks.domain.payload import ConversationData, EventData, ProjectInfo, render_body
from dembrane.webhooks.service import Service
from dembrane.webhooks.store import directory, outbox
from dembrane.webhooks.store.database import Database
from dembrane.webhooks.store.tables import DeliveryRow, WebhookRow
from dembrane.webhooks.v1 import directory_service_pb2 as dpb
from dembrane.webhooks.v1 import event_pb2, webhook_pb2
from dembrane.webhooks.v1 import event_service_pb2 as epb
from dembrane.webhooks.v1 import webhook_service_pb2 as pb

from grpc_helpers import rich_error
from harness import Stubs, Tokens, World
from receiver import Receiver

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
PLAIN_SECRET = "my-shared-secret"
OCCURRED = datetime(2026, 11, 28, 12, 0, 0, 123456, tzinfo=UTC)


async def create_webhook(
    stubs: Stubs,
    tokens: Tokens,
    url: str,
    events: list[str],
    *,
    project_id: str = "p-paid",
    secret: str = SECRET,
) -> str:
    response = await stubs.webhooks.CreateWebhook(
        pb.CreateWebhookRequest(
            project_id=project_id, name="Hook", url=url, events=events, secret=secret
        ),
        metadata=tokens.bearer(tokens.user("u-owner")),
    )
    return str(response.webhook.id)


def conversation_event(
    event_id: str, event_type: str = "conversation.started", project_id: str = "p-paid"
) -> event_pb2.Event:
    event = event_pb2.Event(
        id=event_id,
        type=event_type,
        project_id=project_id,
        conversation=event_pb2.Conversation(
            id="conv-1",
            participant_name="Table 4",
            duration=812.5,
            source="PORTAL_AUDIO",
            is_finished=True,
            is_all_chunks_transcribed=True,
            tags=["green", "mobility"],
            transcript="Host: hello",
            summary="A short talk.",
        ),
    )
    event.occur_time.FromDatetime(OCCURRED)
    event.conversation.created_at.FromDatetime(OCCURRED - timedelta(minutes=10))
    event.conversation.updated_at.FromDatetime(OCCURRED)
    return event


def report_event(event_id: str, project_id: str = "p-paid") -> event_pb2.Event:
    event = event_pb2.Event(
        id=event_id,
        type="report.generated",
        project_id=project_id,
        report=event_pb2.Report(id="rep-1", status="published", language="nl"),
    )
    event.occur_time.FromDatetime(OCCURRED)
    event.report.date_created.FromDatetime(OCCURRED)
    return event


async def publish(
    stubs: Stubs, tokens: Tokens, *events: event_pb2.Event
) -> list[epb.PublishResult]:
    response = await stubs.events.PublishEvents(
        epb.PublishEventsRequest(events=list(events)),
        metadata=tokens.bearer(tokens.service(SCOPE_PUBLISH)),
    )
    return list(response.results)


async def set_tier(stubs: Stubs, tokens: Tokens, workspace_id: str, tier: str) -> None:
    await stubs.directory.UpsertWorkspace(
        dpb.UpsertWorkspaceRequest(workspace_id=workspace_id, name="Workspace", tier=tier),
        metadata=tokens.bearer(tokens.service(SCOPE_DIRECTORY)),
    )


async def deliveries(stubs: Stubs, tokens: Tokens, webhook_id: str) -> list[webhook_pb2.Delivery]:
    response = await stubs.webhooks.ListDeliveries(
        pb.ListDeliveriesRequest(project_id="p-paid", webhook_id=webhook_id),
        metadata=tokens.bearer(tokens.user("u-owner")),
    )
    return list(response.deliveries)


async def settle(stubs: Stubs, tokens: Tokens, webhook_id: str) -> list[webhook_pb2.Delivery]:
    """Wait until no delivery of the webhook is pending; return them all."""
    for _ in range(500):
        found = await deliveries(stubs, tokens, webhook_id)
        if all(d.status != webhook_pb2.DELIVERY_STATUS_PENDING for d in found):
            return found
        await asyncio.sleep(0.01)
    raise AssertionError("deliveries stayed pending")


async def test_each_event_type_reaches_exactly_its_subscribers(
    stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """Every event type reaches the webhooks subscribed to it and no other, correctly signed."""
    types = [
        "conversation.started",
        "conversation.transcribed",
        "conversation.summarized",
        "report.generated",
    ]
    receivers = {t: await Receiver(SECRET).start() for t in types}
    everything = await Receiver(PLAIN_SECRET).start()
    try:
        hooks = {t: await create_webhook(stubs, tokens, receivers[t].url, [t]) for t in types}
        all_hook = await create_webhook(stubs, tokens, everything.url, types, secret=PLAIN_SECRET)
        results = await publish(
            stubs,
            tokens,
            conversation_event("evt-started", "conversation.started"),
            conversation_event("evt-transcribed", "conversation.transcribed"),
            conversation_event("evt-summarized", "conversation.summarized"),
            report_event("evt-report"),
        )
        assert [r.delivery_count for r in results] == [2, 2, 2, 2]
        assert not any(r.duplicate for r in results)

        received = await everything.wait_for(4)
        assert sorted(json.loads(r.body)["event"] for r in received) == sorted(types)
        for event_type, receiver in receivers.items():
            (request,) = await receiver.wait_for(1)
            body = request.json()
            assert isinstance(body, dict)
            assert body["event"] == event_type
            assert request.verified
            assert request.headers["X-Dembrane-Event"] == event_type
            assert request.headers["X-Webhook-Event"] == event_type
            assert request.headers["Content-Type"] == "application/json"
            assert request.headers["User-Agent"].startswith("Dembrane-Webhook/")
            assert request.headers["webhook-id"] == body["id"]
            (delivery,) = await settle(stubs, tokens, hooks[event_type])
            assert request.headers["X-Dembrane-Delivery"] == delivery.id
            assert delivery.status == webhook_pb2.DELIVERY_STATUS_SUCCEEDED
        assert all(r.verified for r in received)
        await asyncio.sleep(0.05)
        assert all(len(r.requests) == 1 for r in receivers.values())
        assert len(everything.requests) == 4
        assert len(await settle(stubs, tokens, all_hook)) == 4
    finally:
        for receiver in (*receivers.values(), everything):
            await receiver.stop()


async def test_bodies_carry_the_fields_of_the_contract(
    stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """Bodies are canonical JSON with the project from the directory and the §6 fields."""
    async with Receiver(SECRET) as receiver:
        await create_webhook(
            stubs, tokens, receiver.url, ["conversation.summarized", "report.generated"]
        )
        linked = conversation_event("evt-linked", "conversation.summarized")
        linked.dashboard_url = "https://example.test/custom"
        await publish(stubs, tokens, conversation_event("evt-s", "conversation.summarized"), linked)
        await publish(stubs, tokens, report_event("evt-r"))
        requests = await receiver.wait_for(3)
        bodies = {r.headers["webhook-id"]: r for r in requests}

        summarized = bodies["evt-s"]
        body = summarized.json()
        assert (
            summarized.body
            == json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
        )
        assert body == {
            "id": "evt-s",
            "event": "conversation.summarized",
            "timestamp": "2026-11-28T12:00:00.123456+00:00",
            "project": {"id": "p-paid", "name": "Paid project", "language": "en"},
            "dashboardUrl": (
                "https://dashboard.example.test/projects/p-paid/conversation/conv-1/overview"
            ),
            "conversation": {
                "id": "conv-1",
                "created_at": "2026-11-28T11:50:00.123456+00:00",
                "updated_at": "2026-11-28T12:00:00.123456+00:00",
                "participant_name": "Table 4",
                "duration": 812.5,
                "source": "PORTAL_AUDIO",
                "is_finished": True,
                "is_all_chunks_transcribed": True,
                "tags": ["green", "mobility"],
                "emails_csv": None,
                "transcript": "Host: hello",
                "summary": "A short talk.",
            },
        }
        assert bodies["evt-linked"].json()["dashboardUrl"] == "https://example.test/custom"  # type: ignore[index]
        report = bodies["evt-r"].json()
        assert isinstance(report, dict)
        assert "conversation" not in report
        assert report["report"] == {
            "id": "rep-1",
            "status": "published",
            "language": "nl",
            "date_created": "2026-11-28T12:00:00.123456+00:00",
        }
        assert report["dashboardUrl"] == "https://dashboard.example.test/projects/p-paid/report"


async def test_started_events_carry_neither_transcript_nor_summary(
    stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """A conversation.started body leaves out the transcript and summary it was given."""
    async with Receiver(SECRET) as receiver:
        await create_webhook(stubs, tokens, receiver.url, ["conversation.started"])
        await publish(stubs, tokens, conversation_event("evt-1"))
        (request,) = await receiver.wait_for(1)
        conversation = request.json()["conversation"]  # type: ignore[index]
        assert "transcript" not in conversation
        assert "summary" not in conversation


async def test_publishing_the_same_id_twice_delivers_once(
    stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """A second publish of an id stores nothing, reports a duplicate, and delivers nothing."""
    async with Receiver(SECRET) as receiver:
        hook = await create_webhook(stubs, tokens, receiver.url, ["conversation.started"])
        (first,) = await publish(stubs, tokens, conversation_event("evt-once"))
        await receiver.wait_for(1)
        (again,) = await publish(stubs, tokens, conversation_event("evt-once"))
        single = await stubs.events.PublishEvent(
            epb.PublishEventRequest(event=conversation_event("evt-once")),
            metadata=tokens.bearer(tokens.service(SCOPE_PUBLISH)),
        )
        assert (first.duplicate, first.delivery_count) == (False, 1)
        assert (again.duplicate, again.delivery_count) == (True, 1)
        assert single.result.duplicate
        await asyncio.sleep(0.1)
        assert len(receiver.requests) == 1
        assert len(await settle(stubs, tokens, hook)) == 1


async def test_a_batch_may_repeat_an_id(stubs: Stubs, tokens: Tokens, world: World) -> None:
    """An id repeated inside one batch is stored and delivered once; later copies are duplicates."""
    async with Receiver(SECRET) as receiver:
        await create_webhook(stubs, tokens, receiver.url, ["conversation.started"])
        results = await publish(
            stubs, tokens, conversation_event("evt-a"), conversation_event("evt-a")
        )
        assert [(r.event_id, r.duplicate) for r in results] == [
            ("evt-a", False),
            ("evt-a", True),
        ]
        await receiver.wait_for(1)
        await asyncio.sleep(0.1)
        assert len(receiver.requests) == 1


async def test_an_id_taken_by_another_projects_or_types_event_is_refused(
    stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """Reusing an event id for another project or event type is ALREADY_EXISTS, in a later
    call or within one batch, rather than a silent duplicate; the same event again, with
    another payload, is still a duplicate."""
    (first,) = await publish(stubs, tokens, conversation_event("evt-shared"))
    assert not first.duplicate
    changed = conversation_event("evt-shared")
    changed.conversation.summary = "Another summary."
    (again,) = await publish(stubs, tokens, changed)
    assert again.duplicate
    for clash in (
        [conversation_event("evt-shared", project_id="p-free")],
        [conversation_event("evt-shared", "conversation.summarized")],
        [conversation_event("evt-new"), conversation_event("evt-new", project_id="p-free")],
        [conversation_event("evt-shared", project_id="p-free"), conversation_event("evt-shared")],
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await publish(stubs, tokens, *clash)
        error = rich_error(caught.value)
        assert (error.code, error.reason) == (grpc.StatusCode.ALREADY_EXISTS, "ALREADY_EXISTS")
        assert "already taken" in error.message
    # Nothing of a refused batch was stored: its first event is new afterwards.
    (fresh,) = await publish(stubs, tokens, conversation_event("evt-new"))
    assert not fresh.duplicate


async def test_an_empty_id_gets_one_assigned(stubs: Stubs, tokens: Tokens, world: World) -> None:
    """Without an id the service assigns an evt_ id, and the receiver sees that id."""
    async with Receiver(SECRET) as receiver:
        await create_webhook(stubs, tokens, receiver.url, ["conversation.started"])
        event = conversation_event("")
        event.ClearField("occur_time")
        before = datetime.now(UTC)
        (result,) = await publish(stubs, tokens, event)
        assert result.event_id.startswith("evt_")
        (request,) = await receiver.wait_for(1)
        body = request.json()
        assert isinstance(body, dict)
        assert body["id"] == result.event_id == request.headers["webhook-id"]
        # Without an occurrence time the event happened when it was published.
        assert datetime.fromisoformat(body["timestamp"]) >= before - timedelta(seconds=1)


@pytest.mark.parametrize(
    ("mutate", "field", "words"),
    [
        (lambda e: setattr(e, "type", "conversation.paused"), "events[1].type", "unknown"),
        (lambda e: setattr(e, "type", ""), "events[1].type", "required"),
        (lambda e: setattr(e, "type", "webhook.test"), "events[1].type", "Test action"),
        (lambda e: setattr(e, "id", "bad id!"), "events[1].id", "letters"),
        (lambda e: setattr(e, "project_id", ""), "events[1].project_id", "required"),
        (lambda e: setattr(e, "project_id", "p-\x00"), "events[1].project_id", "control"),
        (
            lambda e: setattr(e.conversation, "duration", float("nan")),
            "events[1].conversation.duration",
            "finite",
        ),
        (
            lambda e: setattr(e.conversation, "duration", float("inf")),
            "events[1].conversation.duration",
            "finite",
        ),
        (
            lambda e: setattr(e.conversation, "duration", -1.0),
            "events[1].conversation.duration",
            ">= 0",
        ),
        (lambda e: e.ClearField("conversation"), "events[1].conversation", "needs"),
        (lambda e: setattr(e.conversation, "id", ""), "events[1].conversation.id", "required"),
        (
            lambda e: setattr(e, "dashboard_url", "ftp://x"),
            "events[1].dashboard_url",
            "http",
        ),
        (
            lambda e: setattr(e.occur_time, "seconds", 253_402_300_800),
            "events[1].occur_time",
            "valid time",
        ),
        (
            lambda e: setattr(e.conversation.created_at, "nanos", -1),
            "events[1].conversation.created_at",
            "valid time",
        ),
        (
            lambda e: setattr(e.conversation.updated_at, "nanos", 1_000_000_000),
            "events[1].conversation.updated_at",
            "valid time",
        ),
    ],
    ids=[
        "unknown-type",
        "no-type",
        "test-type",
        "bad-id",
        "no-project",
        "nul-in-project",
        "nan-duration",
        "infinite-duration",
        "negative-duration",
        "no-subject",
        "no-conversation-id",
        "bad-link",
        "after-year-9999",
        "negative-nanos",
        "a-whole-second-of-nanos",
    ],
)
async def test_invalid_events_fail_the_whole_batch(
    stubs: Stubs,
    tokens: Tokens,
    world: World,
    mutate: object,
    field: str,
    words: str,
) -> None:
    """A bad event names its field in a clear sentence and nothing of its batch is stored."""
    bad = conversation_event("evt-bad")
    assert callable(mutate)
    mutate(bad)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await publish(stubs, tokens, conversation_event("evt-good"), bad)
    error = rich_error(caught.value)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.violations
    assert words in error.violations[field]
    assert error.message.endswith(".")
    (result,) = await publish(stubs, tokens, conversation_event("evt-good"))
    assert not result.duplicate


async def test_batch_size_is_bounded(stubs: Stubs, tokens: Tokens, world: World) -> None:
    """A call carries 1 to 500 events."""
    for count in (0, 501):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await publish(stubs, tokens, *[conversation_event(f"e{i}") for i in range(count)])
        error = rich_error(caught.value)
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "1 to 500" in error.violations["events"]
    results = await publish(stubs, tokens, *[conversation_event(f"e{i}") for i in range(500)])
    assert len(results) == 500


async def test_an_event_whose_body_exceeds_the_limit_is_refused(
    stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """The limit counts the JSON body's bytes, escapes included, and names the event."""
    limit = DEFAULT_MAX_EVENT_BYTES
    near = conversation_event("evt-near", "conversation.transcribed")
    near.conversation.transcript = "a" * (limit - 4096)
    too_long = conversation_event("evt-long", "conversation.transcribed")
    too_long.conversation.transcript = "a" * limit
    # 2 bytes each in the request, 6 in the body ("\u00e9"): small on the wire, too big sent.
    escaped = conversation_event("evt-escaped", "conversation.transcribed")
    escaped.conversation.transcript = "\u00e9" * (limit // 5)
    assert escaped.ByteSize() < limit
    for index, bad in ((1, too_long), (0, escaped)):
        batch = [near, bad] if index == 1 else [bad, near]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await publish(stubs, tokens, *batch)
        error = rich_error(caught.value)
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert list(error.violations) == [f"events[{index}]"]
        assert "WEBHOOKS_MAX_EVENT_BYTES" in error.violations[f"events[{index}]"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stubs.events.PublishEvent(
            epb.PublishEventRequest(event=too_long),
            metadata=tokens.bearer(tokens.service(SCOPE_PUBLISH)),
        )
    assert list(rich_error(caught.value).violations) == ["event"]
    (result,) = await publish(stubs, tokens, near)
    assert result.event_id == "evt-near"
    assert not result.duplicate


async def test_the_size_limit_counts_the_projects_name(
    stubs: Stubs, tokens: Tokens, world: World, settings: Settings
) -> None:
    """An event whose body fits the limit without its project's name, but not with that
    long, escaped name, is refused: the limit holds for the body as it is sent."""
    limit = DEFAULT_MAX_EVENT_BYTES
    await stubs.directory.UpsertProject(
        dpb.UpsertProjectRequest(
            project_id="p-emoji",
            workspace_id=world.paid_workspace,
            name="\U0001f600" * 200,  # 12 bytes each once escaped: 2,400 in the body
            language="nl",
        ),
        metadata=tokens.bearer(tokens.service(SCOPE_DIRECTORY)),
    )
    events = {}
    for project_id in ("p-emoji", world.paid_project):
        event = conversation_event(f"evt-{project_id}", "conversation.transcribed", project_id)
        event.conversation.transcript = ""
        errors = ErrorCollector()
        data = event_from_pb(event, "event", datetime.now(UTC), errors)
        nameless = render_body(data, ProjectInfo(project_id, "", ""), settings.dashboard_base_url)
        # Without any name or language the body is 1,000 bytes under the limit.
        event.conversation.transcript = "a" * (limit - 1000 - len(nameless))
        events[project_id] = event
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await publish(stubs, tokens, events["p-emoji"])
    error = rich_error(caught.value)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"{limit - 1000 + 2400 + len('nl'):,} bytes" in error.violations["events[0]"]
    (result,) = await publish(stubs, tokens, events[world.paid_project])
    assert result.event_id == f"evt-{world.paid_project}"
    assert not result.duplicate


async def test_an_unknown_project_is_refused(stubs: Stubs, tokens: Tokens, world: World) -> None:
    """Events of a project the directory does not know fail with PROJECT_UNKNOWN."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await publish(stubs, tokens, conversation_event("evt-x", project_id="p-nowhere"))
    error = rich_error(caught.value)
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.reason == "PROJECT_UNKNOWN"
    assert "p-nowhere" in error.message


async def test_publishing_needs_the_publish_scope(
    stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """A user token cannot publish."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stubs.events.PublishEvent(
            epb.PublishEventRequest(event=conversation_event("evt-u")),
            metadata=tokens.bearer(tokens.user("u-owner")),
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_tier_downgrade_stops_delivery_and_an_upgrade_resumes_it(
    stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """Below changemaker events are skipped with the reason; after upgrading, new ones go out."""
    async with Receiver(SECRET) as receiver:
        hook = await create_webhook(stubs, tokens, receiver.url, ["conversation.started"])
        await set_tier(stubs, tokens, "ws-paid", "innovator")
        (skipped,) = await publish(stubs, tokens, conversation_event("evt-while-low"))
        assert skipped.delivery_count == 0
        assert skipped.skip_reason == (
            "The workspace is on the innovator tier; webhooks need changemaker."
        )
        await set_tier(stubs, tokens, "ws-paid", "guardian")
        (resumed,) = await publish(stubs, tokens, conversation_event("evt-after"))
        assert (resumed.delivery_count, resumed.skip_reason) == (1, "")
        (request,) = await receiver.wait_for(1)
        assert request.headers["webhook-id"] == "evt-after"
        log = await settle(stubs, tokens, hook)
        by_status = {d.event_id: d for d in log}
        assert by_status["evt-while-low"].status == webhook_pb2.DELIVERY_STATUS_SKIPPED
        assert by_status["evt-while-low"].attempt_count == 0
        assert "innovator" in by_status["evt-while-low"].skip_reason
        assert by_status["evt-after"].status == webhook_pb2.DELIVERY_STATUS_SUCCEEDED
        await asyncio.sleep(0.05)
        assert len(receiver.requests) == 1


async def test_a_free_workspace_records_events_as_skipped(
    stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """Events of a project whose workspace was always below changemaker are recorded skipped."""
    (result,) = await publish(stubs, tokens, conversation_event("evt-free", project_id="p-free"))
    assert result.delivery_count == 0
    assert "innovator" in result.skip_reason
    (again,) = await publish(stubs, tokens, conversation_event("evt-free", project_id="p-free"))
    assert again.duplicate
    assert again.skip_reason == result.skip_reason


async def test_deliveries_pending_at_a_downgrade_are_skipped_when_due(tmp_path: Path) -> None:
    """Deliveries queued before a downgrade are skipped, unsent, once the tier is too low."""
    from harness import make_settings

    settings = make_settings(tmp_path)
    database = Database(settings.database_url)
    database.migrate()
    now = datetime.now(UTC).timestamp()

    def seed(session: Session) -> None:
        directory.upsert_workspace(session, "ws", "W", Tier.CHANGEMAKER, now)
        session.flush()
        directory.upsert_project(session, "p", "ws", "P", "en", now)
        session.add(
            WebhookRow(
                id="wh_1",
                project_id="p",
                name="n",
                url="http://127.0.0.1:9/hook",
                events='["conversation.started"]',
                status="published",
                secret=SECRET,
                created_at=now,
                updated_at=now,
            )
        )
        session.flush()
        outbox.publish_events(
            session,
            [EventData("e1", "conversation.started", "p", OCCURRED, ConversationData("c"))],
            now=now,
            dashboard_base_url="https://d",
        )
        directory.upsert_workspace(session, "ws", "W", Tier.INNOVATOR, now)

    database.call(seed)
    database.close()
    service = Service(settings)
    await service.start()
    try:
        assert service.resources is not None
        for _ in range(300):
            (row,) = await service.resources.database.run(outbox.deliveries_of_event, "e1")
            if row.status != "pending":
                break
            await asyncio.sleep(0.01)
        assert row.status == "skipped"
        assert row.attempt_count == 0
        assert row.skip_reason == (
            "The workspace is on the innovator tier; webhooks need changemaker."
        )
    finally:
        await service.stop()


async def test_a_new_url_ends_the_hold_of_the_old_receivers_breaker(
    service: Service, stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """Deliveries the breaker held back after the old address kept failing are due the
    moment an admin points the webhook at a new address, and go there: the cool-down was
    about the old receiver."""
    assert service.resources is not None
    database = service.resources.database
    async with Receiver(SECRET, default=500) as broken, Receiver(SECRET) as fixed:
        webhook_id = await create_webhook(stubs, tokens, broken.url, ["conversation.started"])
        ids = [f"evt-{i}" for i in range(8)]
        await publish(stubs, tokens, *[conversation_event(i) for i in ids])

        async def rows() -> list[DeliveryRow]:
            found = [await database.run(outbox.deliveries_of_event, i) for i in ids]
            return [row for group in found for row in group]

        for _ in range(500):
            now = time.time()
            held = [
                r
                for r in await rows()
                if r.status == "pending"
                and r.lease_owner is None
                and (r.next_attempt_at or 0) > now + 1
            ]
            if held:
                break
            await asyncio.sleep(0.01)
        assert held, "the breaker never held a delivery back"

        await stubs.webhooks.UpdateWebhook(
            pb.UpdateWebhookRequest(
                project_id=world.paid_project,
                webhook_id=webhook_id,
                url=fixed.url,
                update_mask=field_mask_pb2.FieldMask(paths=["url"]),
            ),
            metadata=tokens.bearer(tokens.user(world.owner)),
        )
        changed = time.time()
        waiting = {r.id: r for r in await rows() if r.status == "pending"}
        assert all(
            r.lease_owner is not None or (r.next_attempt_at or 0) <= changed
            for r in waiting.values()
        )
        await fixed.wait_for(len(held), within=10)
        delivered = {r.headers["x-dembrane-delivery"] for r in fixed.requests}
        assert {r.id for r in held} <= delivered


def test_publish_refuses_unknown_projects_before_writing(tmp_path: Path) -> None:
    """The store refuses a batch naming an unknown project and writes none of it."""
    database = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    database.migrate()
    now = datetime.now(UTC).timestamp()

    def attempt(session: Session) -> None:
        directory.upsert_workspace(session, "ws", "W", Tier.CHANGEMAKER, now)
        session.flush()
        directory.upsert_project(session, "p", "ws", "P", "en", now)
        session.flush()
        outbox.publish_events(
            session,
            [
                EventData("ok", "conversation.started", "p", OCCURRED, ConversationData("c")),
                EventData("no", "conversation.started", "q", OCCURRED, ConversationData("c")),
            ],
            now=now,
            dashboard_base_url="https://d",
        )

    with pytest.raises(FailedPrecondition):
        database.call(attempt)
    assert database.call(lambda s: outbox.event_row(s, "ok")) is None
    database.close()
