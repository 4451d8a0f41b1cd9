"""The delivery log: listing, inspecting, retrying and recovering deliveries; retention."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import update
from sqlmodel import Session, select

from dembrane.webhooks import metrics
from dembrane.webhooks.api import delivery_log
from dembrane.webhooks.auth import SCOPE_PUBLISH
from dembrane.webhooks.config import Settings
from dembrane.webhooks.delivery.backlog import BacklogWatch
from dembrane.webhooks.delivery.retention import RetentionTask, purge_expired
from dembrane.webhooks.domain.access import Tier
from dembrane.webhooks.domain.payload import ConversationData, EventData
from dembrane.webhooks.store import directory, outbox, webhooks
from dembrane.webhooks.store.database import Database
from dembrane.webhooks.store.tables import AttemptRow, DeliveryRow, EventRow, WebhookRow
from dembrane.webhooks.v1 import event_pb2, webhook_pb2
from dembrane.webhooks.v1 import event_service_pb2 as epb
from dembrane.webhooks.v1 import webhook_service_pb2 as pb

from grpc_helpers import rich_error
from harness import Stubs, Tokens, World, make_settings
from receiver import Receiver, Reply, unused_port

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
FAILED = webhook_pb2.DELIVERY_STATUS_FAILED
SUCCEEDED = webhook_pb2.DELIVERY_STATUS_SUCCEEDED
PENDING = webhook_pb2.DELIVERY_STATUS_PENDING


class Log:
    """The delivery-log calls of one webhook of ``p-paid``, made as its owner."""

    def __init__(self, stubs: Stubs, tokens: Tokens, webhook_id: str) -> None:
        self.stubs = stubs
        self.tokens = tokens
        self.webhook_id = webhook_id
        self.md = tokens.bearer(tokens.user("u-owner"))

    async def list(self, **fields: object) -> pb.ListDeliveriesResponse:
        request = pb.ListDeliveriesRequest(
            project_id="p-paid",
            webhook_id=self.webhook_id,
            **fields,  # type: ignore[arg-type]
        )
        response: pb.ListDeliveriesResponse = await self.stubs.webhooks.ListDeliveries(
            request, metadata=self.md
        )
        return response

    async def get(self, delivery_id: str) -> webhook_pb2.Delivery:
        response = await self.stubs.webhooks.GetDelivery(
            pb.GetDeliveryRequest(
                project_id="p-paid", webhook_id=self.webhook_id, delivery_id=delivery_id
            ),
            metadata=self.md,
        )
        return response.delivery

    async def retry(self, delivery_id: str) -> webhook_pb2.Delivery:
        response = await self.stubs.webhooks.RetryDelivery(
            pb.RetryDeliveryRequest(
                project_id="p-paid", webhook_id=self.webhook_id, delivery_id=delivery_id
            ),
            metadata=self.md,
        )
        return response.delivery

    async def recover(
        self, start: float | None, end: float | None = None
    ) -> pb.RecoverWebhookResponse:
        request = pb.RecoverWebhookRequest(project_id="p-paid", webhook_id=self.webhook_id)
        if start is not None:
            request.start_time.CopyFrom(stamp(start))
        if end is not None:
            request.end_time.CopyFrom(stamp(end))
        response: pb.RecoverWebhookResponse = await self.stubs.webhooks.RecoverWebhook(
            request, metadata=self.md
        )
        return response

    async def set_status(self, status: webhook_pb2.WebhookStatus.ValueType) -> None:
        await self.stubs.webhooks.UpdateWebhook(
            pb.UpdateWebhookRequest(project_id="p-paid", webhook_id=self.webhook_id, status=status),
            metadata=self.md,
        )

    async def settled(self, count: int) -> list[webhook_pb2.Delivery]:
        """Wait until the webhook has ``count`` deliveries and none is pending."""
        for _ in range(800):
            found = list((await self.list(page_size=200)).deliveries)
            if len(found) == count and all(d.status != PENDING for d in found):
                return found
            await asyncio.sleep(0.01)
        raise AssertionError("the deliveries did not settle")


def stamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


async def create_webhook(
    stubs: Stubs, tokens: Tokens, url: str, events: tuple[str, ...] = ("conversation.started",)
) -> Log:
    response = await stubs.webhooks.CreateWebhook(
        pb.CreateWebhookRequest(
            project_id="p-paid", name="Hook", url=url, events=list(events), secret=SECRET
        ),
        metadata=tokens.bearer(tokens.user("u-owner")),
    )
    return Log(stubs, tokens, response.webhook.id)


def event(event_id: str, event_type: str = "conversation.started") -> event_pb2.Event:
    if event_type == "report.generated":
        return event_pb2.Event(
            id=event_id,
            type=event_type,
            project_id="p-paid",
            report=event_pb2.Report(id="r1", status="published", language="en"),
        )
    return event_pb2.Event(
        id=event_id,
        type=event_type,
        project_id="p-paid",
        conversation=event_pb2.Conversation(id="c1"),
    )


async def publish(stubs: Stubs, tokens: Tokens, *events: event_pb2.Event) -> None:
    await stubs.events.PublishEvents(
        epb.PublishEventsRequest(events=list(events)),
        metadata=tokens.bearer(tokens.service(SCOPE_PUBLISH)),
    )


# -- listing and inspecting ----------------------------------------------------------------


async def test_deliveries_are_listed_newest_first_and_filtered(
    stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """The list is newest first and filters by status and by event type."""
    # A 4xx answer fails attempts without tripping the circuit breaker (the receiver is up).
    async with Receiver(SECRET, default=400) as receiver:
        log = await create_webhook(
            stubs, tokens, receiver.url, ("conversation.started", "report.generated")
        )
        await publish(stubs, tokens, event("e1"), event("e2", "report.generated"))
        await log.settled(2)
        receiver.default = Reply(200)
        await publish(stubs, tokens, event("e3"))
        await publish(stubs, tokens, event("e4", "report.generated"))
        await publish(stubs, tokens, event("e5"))
        everything = await log.settled(5)

        assert [d.event_id for d in everything][:3] == ["e5", "e4", "e3"]
        assert {d.event_id for d in everything[3:]} == {"e1", "e2"}
        # Each listed delivery carries its attempts: the failed ones their 400s.
        assert all([a.status_code for a in d.attempts] == [200] for d in everything[:3])
        assert all(
            [a.status_code for a in d.attempts] == [400, 400, 400, 400] for d in everything[3:]
        )
        failed = (await log.list(status=FAILED)).deliveries
        assert {d.event_id for d in failed} == {"e1", "e2"}
        succeeded = (await log.list(status=SUCCEEDED)).deliveries
        assert [d.event_id for d in succeeded] == ["e5", "e4", "e3"]
        reports = (await log.list(event_type="report.generated")).deliveries
        assert {d.event_id for d in reports} == {"e2", "e4"}
        both = (await log.list(event_type="report.generated", status=SUCCEEDED)).deliveries
        assert [d.event_id for d in both] == ["e4"]
        assert all(d.event_type == "report.generated" for d in reports)


async def test_the_list_pages_through_every_delivery_once(
    stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """Page tokens walk the whole log in order, without repeats."""
    async with Receiver(SECRET) as receiver:
        log = await create_webhook(stubs, tokens, receiver.url)
        for index in range(7):
            await publish(stubs, tokens, event(f"e{index}"))
        everything = await log.settled(7)
        seen: list[str] = []
        token = ""
        while True:
            page = await log.list(page_size=3, page_token=token)
            assert len(page.deliveries) <= 3
            seen.extend(d.id for d in page.deliveries)
            token = page.next_page_token
            if not token:
                break
        assert seen == [d.id for d in everything]
        assert len(set(seen)) == 7


async def test_bad_filters_and_tokens_are_refused(
    stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """An unknown event type or a forged page token is an invalid argument."""
    async with Receiver(SECRET) as receiver:
        log = await create_webhook(stubs, tokens, receiver.url)
        for fields in ({"event_type": "conversation.paused"}, {"page_token": "bogus"}):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await log.list(**fields)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_delivery_shows_every_attempt_with_a_bounded_excerpt(
    stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """GetDelivery lists each attempt's time, status, latency, first 20 kB of body and error."""
    async with Receiver(SECRET, replies=[Reply(500, body=b"x" * 30_000)]) as receiver:
        log = await create_webhook(stubs, tokens, receiver.url)
        await publish(stubs, tokens, event("e1"))
        (listed,) = await log.settled(1)
        delivery = await log.get(listed.id)
    assert delivery.id == listed.id
    assert delivery.event_id == "e1"
    assert delivery.webhook_id == log.webhook_id
    assert delivery.status == SUCCEEDED
    first, second = delivery.attempts
    assert first.status_code == 500
    assert first.response_body == "x" * 20_000
    assert first.error == "The receiver answered with status 500."
    assert not first.success
    assert first.latency.ToNanoseconds() > 0
    assert first.attempt_time.seconds > 0
    assert second.success
    assert (second.status_code, second.response_body) == (200, "ok")
    assert delivery.last_attempt_time == second.attempt_time


async def test_the_list_shows_the_latest_attempts_with_a_short_excerpt(
    stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """ListDeliveries gives each delivery's last five attempts, oldest first, with the first
    500 characters of each answer; GetDelivery still has all of them, bodies whole."""
    body = b"y" * 2_000
    async with Receiver(SECRET, default=Reply(500, body=body)) as receiver:
        log = await create_webhook(stubs, tokens, receiver.url)
        await publish(stubs, tokens, event("e1"))
        (failed,) = await log.settled(1)
        # Four attempts of the schedule, then two more by hand: six in all.
        for expected in (5, 6):
            await log.retry(failed.id)
            await receiver.wait_for(expected)
            for _ in range(800):
                (listed,) = (await log.list()).deliveries
                if listed.status == FAILED and listed.attempt_count == expected:
                    break
                await asyncio.sleep(0.01)
        (listed,) = (await log.list()).deliveries
        full = await log.get(failed.id)
    assert [a.number for a in listed.attempts] == [2, 3, 4, 5, 6]
    assert all(a.response_body == "y" * 500 for a in listed.attempts)
    assert all(a.status_code == 500 and not a.success for a in listed.attempts)
    assert [a.number for a in full.attempts] == [1, 2, 3, 4, 5, 6]
    assert all(a.response_body == "y" * 2_000 for a in full.attempts)
    last, logged = listed.attempts[-1], full.attempts[-1]
    assert (last.attempt_time, last.latency, last.error) == (
        logged.attempt_time,
        logged.latency,
        logged.error,
    )


async def test_an_answer_holding_nul_characters_is_logged(
    stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """A receiver's answer with NUL bytes is kept with U+FFFD in their place, so the outcome
    is recorded on PostgreSQL too (its text columns cannot hold a NUL)."""
    async with Receiver(SECRET, replies=[Reply(500, body=b"bad\x00answer")]) as receiver:
        log = await create_webhook(stubs, tokens, receiver.url)
        await publish(stubs, tokens, event("e1"))
        (listed,) = await log.settled(1)
        delivery = await log.get(listed.id)
    assert delivery.status == SUCCEEDED
    first, second = delivery.attempts
    assert (first.status_code, first.response_body) == (500, "bad\ufffdanswer")
    assert second.success


async def test_an_attempt_without_an_answer_has_no_status_code(
    stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """A refused connection is logged with its error and without a status code."""
    port = unused_port()
    log = await create_webhook(stubs, tokens, f"http://127.0.0.1:{port}/hook")
    await publish(stubs, tokens, event("e1"))
    (listed,) = await log.settled(1)
    delivery = await log.get(listed.id)
    assert delivery.status == FAILED
    assert delivery.attempt_count == 4
    assert not delivery.HasField("last_status_code")
    for attempt in delivery.attempts:
        assert not attempt.HasField("status_code")
        assert attempt.error == f"Connection refused by 127.0.0.1:{port}."


async def test_deliveries_of_other_webhooks_are_not_found(
    stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """A delivery is only found through its own webhook."""
    async with Receiver(SECRET) as receiver:
        mine = await create_webhook(stubs, tokens, receiver.url)
        other = await create_webhook(stubs, tokens, receiver.url)
        await publish(stubs, tokens, event("e1"))
        (delivery,) = await mine.settled(1)
        for call in (other.get, other.retry, mine.get):
            target = "dlv_missing" if call == mine.get else delivery.id
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call(target)
            error = rich_error(caught.value)
            assert error.code == grpc.StatusCode.NOT_FOUND
            assert error.message == "Delivery not found"


async def test_only_managers_read_the_log(stubs: Stubs, tokens: Tokens, world: World) -> None:
    """A member without the admin role is refused; an outsider does not see the project."""
    async with Receiver(SECRET) as receiver:
        log = await create_webhook(stubs, tokens, receiver.url)
        for user, code in (
            ("u-member", grpc.StatusCode.PERMISSION_DENIED),
            ("u-outsider", grpc.StatusCode.NOT_FOUND),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stubs.webhooks.ListDeliveries(
                    pb.ListDeliveriesRequest(project_id="p-paid", webhook_id=log.webhook_id),
                    metadata=tokens.bearer(tokens.user(user)),
                )
            assert caught.value.code() == code


# -- retry and recover ---------------------------------------------------------------------


async def test_retrying_sends_a_failed_delivery_again_now(
    stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """RetryDelivery makes a failed delivery due at once and answers with its attempts so far;
    the receiver gets it again."""
    async with Receiver(SECRET, default=500) as receiver:
        log = await create_webhook(stubs, tokens, receiver.url)
        await publish(stubs, tokens, event("e1"))
        (failed,) = await log.settled(1)
        assert failed.status == FAILED
        receiver.default = Reply(200)
        retried = await log.retry(failed.id)
        assert retried.status == PENDING
        assert retried.HasField("next_attempt_time")
        # The answer shows the history so far, not an empty one.
        assert [a.status_code for a in retried.attempts] == [500, 500, 500, 500]
        requests = await receiver.wait_for(5)
        (done,) = await log.settled(1)
    assert done.status == SUCCEEDED
    assert done.attempt_count == 5
    assert {r.headers["X-Dembrane-Delivery"] for r in requests} == {failed.id}


async def test_retrying_needs_a_published_webhook(
    stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """A disabled webhook's deliveries are not retried until it is published again."""
    async with Receiver(SECRET, replies=[410]) as receiver:
        log = await create_webhook(stubs, tokens, receiver.url)
        await publish(stubs, tokens, event("e1"))
        (failed,) = await log.settled(1)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await log.retry(failed.id)
        error = rich_error(caught.value)
        assert error.code == grpc.StatusCode.FAILED_PRECONDITION
        assert error.reason == "WEBHOOK_NOT_PUBLISHED"
        assert "disabled" in error.message
        await log.set_status(webhook_pb2.WEBHOOK_STATUS_PUBLISHED)
        await log.retry(failed.id)
        await receiver.wait_for(2)
        (done,) = await log.settled(1)
        assert done.status == SUCCEEDED


async def test_recovering_resends_the_failed_deliveries_of_a_window(
    stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """RecoverWebhook queues the window's failed deliveries and they go out again."""
    async with Receiver(SECRET, default=400) as receiver:
        log = await create_webhook(stubs, tokens, receiver.url)
        start = time.time() - 1
        await publish(stubs, tokens, event("e1"), event("e2"))
        await log.settled(2)
        middle = time.time()
        await asyncio.sleep(0.01)
        await publish(stubs, tokens, event("e3"))
        await log.settled(3)
        receiver.default = Reply(200)

        answer = await log.recover(start, middle)
        assert answer.delivery_count == 2
        assert answer.recovery_id.startswith("rcv_")
        for _ in range(500):
            found = {d.event_id: d for d in (await log.list()).deliveries}
            if found["e1"].status == found["e2"].status == SUCCEEDED:
                break
            await asyncio.sleep(0.01)
        assert found["e1"].status == found["e2"].status == SUCCEEDED
        assert found["e3"].status == FAILED
        assert (await log.recover(start, middle)).delivery_count == 0
        assert (await log.recover(start)).delivery_count == 1


async def test_a_recovery_is_queued_in_the_store_when_it_is_answered(
    stubs: Stubs, tokens: Tokens, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RecoverWebhook answers only once every delivery of its window is queued in the store
    (here one per transaction), so a crash right after the answer loses none of them."""
    monkeypatch.setattr(delivery_log, "RECOVERY_BATCH_SIZE", 1)
    async with Receiver(SECRET, default=400) as receiver:
        log = await create_webhook(stubs, tokens, receiver.url)
        start = time.time() - 1
        await publish(stubs, tokens, *(event(f"e{i}") for i in range(6)))
        await log.settled(6)
        receiver.default = Reply(200)
        answer = await log.recover(start)
        statuses = [d.status for d in (await log.list()).deliveries]
    assert answer.delivery_count == 6
    assert FAILED not in statuses


async def test_events_a_disabled_or_paused_webhook_missed_are_in_its_log(
    stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """An event published while a webhook is disabled is logged as failed, unsent, and
    RecoverWebhook sends it once the webhook is published again; while a webhook is paused
    (draft) its events are logged as skipped. Only archived webhooks get no rows."""
    async with Receiver(SECRET, replies=[410]) as receiver:
        disabled = await create_webhook(stubs, tokens, receiver.url)
        paused = await create_webhook(stubs, tokens, receiver.url)
        archived = await create_webhook(stubs, tokens, receiver.url)
        await paused.set_status(webhook_pb2.WEBHOOK_STATUS_DRAFT)
        await archived.set_status(webhook_pb2.WEBHOOK_STATUS_ARCHIVED)
        start = time.time() - 1
        await publish(stubs, tokens, event("e-gone"))
        await disabled.settled(1)  # the 410 disables it
        await publish(stubs, tokens, event("e-missed"))

        missed = {d.event_id: d for d in await disabled.settled(2)}["e-missed"]
        assert missed.status == FAILED
        assert missed.attempt_count == 0
        assert "disabled" in missed.last_error
        assert "not sent" in missed.last_error
        (skipped,) = [d for d in await paused.settled(2) if d.event_id == "e-missed"]
        assert skipped.status == webhook_pb2.DELIVERY_STATUS_SKIPPED
        assert "draft" in skipped.skip_reason
        assert (await archived.list()).deliveries == []

        await disabled.set_status(webhook_pb2.WEBHOOK_STATUS_PUBLISHED)
        assert (await disabled.recover(start)).delivery_count == 2
        requests = await receiver.wait_for(3)
        assert [r.headers["webhook-id"] for r in requests[1:]].count("e-missed") == 1
        found = {d.event_id: d for d in await disabled.settled(2)}
        assert found["e-missed"].status == SUCCEEDED


async def test_a_recovery_window_of_invalid_timestamps_is_refused(
    stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """Timestamps outside what google.protobuf.Timestamp allows (negative nanos, year 10000)
    are INVALID_ARGUMENT naming the field, not read as some other time."""
    log = await create_webhook(stubs, tokens, "http://127.0.0.1:9/hook")
    now = int(time.time())
    for field, start, end in (
        ("start_time", Timestamp(seconds=now - 60, nanos=-5), None),
        ("end_time", Timestamp(seconds=now - 60), Timestamp(seconds=253_402_300_800)),
    ):
        request = pb.RecoverWebhookRequest(
            project_id="p-paid", webhook_id=log.webhook_id, start_time=start, end_time=end
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stubs.webhooks.RecoverWebhook(request, metadata=log.md)
        error = rich_error(caught.value)
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert field in error.violations


@pytest.mark.parametrize(
    ("window", "field"),
    [
        (lambda now: (None, None), "start_time"),
        (lambda now: (now - 31 * 86400, None), "start_time"),
        (lambda now: (now - 60, now - 120), "end_time"),
        (lambda now: (now + 3600, None), "start_time"),
    ],
    ids=["no-start", "before-retention", "end-before-start", "start-in-the-future"],
)
async def test_recovery_windows_are_checked(
    stubs: Stubs,
    tokens: Tokens,
    world: World,
    window: Callable[[float], tuple[float | None, float | None]],
    field: str,
) -> None:
    """A window needs a start within the retention period and not in the future, and an end
    after its start; the error names the one field at fault."""
    async with Receiver(SECRET) as receiver:
        log = await create_webhook(stubs, tokens, receiver.url)
        start, end = window(time.time())
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await log.recover(start, end)
        error = rich_error(caught.value)
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert list(error.violations) == [field]


# -- retention -------------------------------------------------------------------------------

DAY = 86400.0


def _seed_history(database: Database, now: float) -> None:
    """Three events 40 days old (two delivered, one still pending) and one from today."""

    def seed(session: Session) -> None:
        directory.upsert_workspace(session, "ws", "W", Tier.CHANGEMAKER, now - 50 * DAY)
        session.flush()
        directory.upsert_project(session, "p", "ws", "P", "en", now - 50 * DAY)
        session.add(
            WebhookRow(
                id="wh",
                project_id="p",
                name="n",
                url="http://127.0.0.1:9/hook",
                events='["conversation.started"]',
                status="published",
                secret=SECRET,
                created_at=now - 50 * DAY,
                updated_at=now - 50 * DAY,
            )
        )
        session.flush()

    database.call(seed)
    old, recent = now - 40 * DAY, now - 3600

    def publish_at(when: float, *ids: str) -> None:
        events = [
            EventData(
                i,
                "conversation.started",
                "p",
                datetime.fromtimestamp(when, UTC),
                ConversationData("c"),
            )
            for i in ids
        ]
        database.call(
            lambda s: outbox.publish_events(s, events, now=when, dashboard_base_url="https://d")
        )

    def deliver_all(when: float) -> None:
        claims = database.call(lambda s: outbox.claim_due(s, "me", when, 60, 100))
        results = [
            outbox.DeliveryResult(
                delivery_id=c.delivery_id,
                webhook_id=c.webhook_id,
                status=outbox.DeliveryState.SUCCEEDED,
                attempt_count=1,
                attempts=(outbox.AttemptRecord(1, when, 200, 3.0, "ok", "", True),),
            )
            for c in claims
        ]
        database.call(lambda s: outbox.record_results(s, "me", results, [], when, 5 * DAY))

    publish_at(old, "old-1", "old-2")
    deliver_all(old)
    publish_at(old, "old-pending")
    # Leased far ahead by another dispatcher, so it stays pending through what follows.
    database.call(lambda s: outbox.claim_due(s, "other", old, 100 * DAY, 100))
    publish_at(recent, "recent")
    deliver_all(recent)


def _ids(database: Database, table: type[EventRow] | type[DeliveryRow] | type[AttemptRow]) -> int:
    return len(database.call(lambda s: list(s.scalars(select(table)))))


async def test_retention_deletes_old_events_and_attempts_in_batches(tmp_path: Path) -> None:
    """Events and attempts past the retention period go; recent and pending work stays."""
    database = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    database.migrate()
    now = time.time()
    _seed_history(database, now)
    assert (_ids(database, EventRow), _ids(database, AttemptRow)) == (4, 3)

    counts = await purge_expired(database, 30 * DAY, now=now, batch_size=1, event_batch_size=1)

    assert (counts.events, counts.attempts) == (2, 2)
    remaining = {e.id for e in database.call(lambda s: list(s.scalars(select(EventRow))))}
    assert remaining == {"old-pending", "recent"}
    assert _ids(database, DeliveryRow) == 2
    assert _ids(database, AttemptRow) == 1
    again = await purge_expired(database, 30 * DAY, now=now)
    assert (again.events, again.attempts) == (0, 0)
    database.close()


async def test_retention_keeps_the_attempts_of_a_delivery_still_retrying(
    tmp_path: Path,
) -> None:
    """An old attempt of a delivery that is still pending stays in the log, so its attempts
    match its count until it is done; once it is done, it goes with its event."""
    database = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    database.migrate()
    now = time.time()
    _seed_history(database, now)
    old = now - 40 * DAY
    event = EventData(
        "old-retrying",
        "conversation.started",
        "p",
        datetime.fromtimestamp(old, UTC),
        ConversationData("c"),
    )
    database.call(
        lambda s: outbox.publish_events(s, [event], now=old, dashboard_base_url="https://d")
    )
    (claim,) = database.call(lambda s: outbox.claim_due(s, "me", now, 60, 100))
    failed = outbox.AttemptRecord(1, old, 500, 3.0, "no", "HTTP 500", False)
    retrying = outbox.DeliveryResult(
        claim.delivery_id,
        claim.webhook_id,
        outbox.DeliveryState.PENDING,
        attempt_count=1,
        next_attempt_at=now + 60,
        attempts=(failed,),
    )
    database.call(lambda s: outbox.record_results(s, "me", [retrying], [], now, 5 * DAY))

    await purge_expired(database, 30 * DAY, now=now)
    (delivery, attempts) = database.call(
        lambda s: outbox.get_delivery(s, claim.webhook_id, claim.delivery_id)
    )
    assert delivery.status == outbox.DeliveryState.PENDING.value
    assert [a.number for a in attempts] == [1]

    done = dataclasses.replace(
        retrying,
        status=outbox.DeliveryState.FAILED,
        attempt_count=2,
        next_attempt_at=None,
        attempts=(dataclasses.replace(failed, number=2, attempted_at=old + 1),),
    )
    database.call(lambda s: outbox.claim_due(s, "me", now + 61, 60, 100))
    database.call(lambda s: outbox.record_results(s, "me", [done], [], now, 5 * DAY))
    counts = await purge_expired(database, 30 * DAY, now=now)
    assert counts.attempts == 2
    assert (
        database.call(lambda s: outbox.get_delivery(s, claim.webhook_id, claim.delivery_id)) is None
    )
    database.close()


async def test_the_retention_task_runs_in_the_background(tmp_path: Path) -> None:
    """The periodic task purges on its own and stops cleanly."""
    database = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    database.migrate()
    _seed_history(database, time.time())
    task = RetentionTask(database, retention_days=30, first_delay=0, interval=3600)
    task.start()
    try:
        for _ in range(300):
            if _ids(database, EventRow) == 2:
                break
            await asyncio.sleep(0.01)
        assert _ids(database, EventRow) == 2
    finally:
        await task.stop()
        database.close()


class _CountingBatches(Database):
    """The real store, noting how many rows each batch of a deletion removed."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.batches: list[int] = []
        self.began = asyncio.Event()

    async def run_relaxed(self, fn: Callable[..., Any], *args: Any) -> Any:
        result = await super().run_relaxed(fn, *args)
        if fn is webhooks.delete_some_deliveries:
            self.batches.append(result)
            self.began.set()
        return result


async def test_a_long_history_is_deleted_in_short_transactions(tmp_path: Path) -> None:
    """Deleting a webhook removes its deliveries and attempts a batch per transaction, so
    that other writes go on in between, and then the webhook; nothing of it is left."""
    database = _CountingBatches(f"sqlite:///{tmp_path / 'db.sqlite'}")
    database.migrate()
    now = time.time()
    _seed_history(database, now)
    more = [
        EventData(
            f"more-{i}", "conversation.started", "p", datetime.now(UTC), ConversationData("c")
        )
        for i in range(346)
    ]
    database.call(lambda s: outbox.publish_events(s, more, now=now, dashboard_base_url="https://d"))
    assert _ids(database, DeliveryRow) == 350

    deletion = asyncio.create_task(
        webhooks.delete_gradually(
            database, ["wh"], lambda s: webhooks.delete_webhook(s, "wh"), batch=100
        )
    )
    await database.began.wait()
    # A write asked for now runs before the deletion has taken its last batch.
    batches_before = await database.run(lambda _s: len(database.batches))
    await deletion

    assert batches_before < 4
    assert database.batches == [100, 100, 100, 50]
    assert (_ids(database, DeliveryRow), _ids(database, AttemptRow)) == (0, 0)
    assert _ids(database, WebhookRow) == 0
    database.close()


async def test_metrics_show_the_backlog_the_store_holds(tmp_path: Path) -> None:
    """/metrics reads the backlog from the store: every pending delivery, leased ones
    included, and how long the one due longest has waited."""
    database = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    database.migrate()
    now = time.time()
    _seed_history(database, now)  # one delivery pending, leased far ahead
    late = [
        EventData(
            f"late-{i}", "conversation.started", "p", datetime.now(UTC), ConversationData("c")
        )
        for i in range(2)
    ]
    database.call(
        lambda s: outbox.publish_events(s, late, now=now - 100, dashboard_base_url="https://d")
    )
    watch = BacklogWatch(database, interval=3600)
    metrics.STATS.pending = None
    watch.start()
    try:
        for _ in range(500):
            if metrics.STATS.pending is not None:
                break
            await asyncio.sleep(0.01)
    finally:
        await watch.stop()
        database.close()
    text = metrics.exposition().decode()
    assert "webhooks_deliveries_pending 3.0" in text
    (line,) = [ln for ln in text.splitlines() if ln.startswith("webhooks_oldest_due_delivery_s")]
    assert 100 <= float(line.split()[1]) < 130


class TestKeptForever:
    """WEBHOOKS_RETENTION_DAYS=0 keeps the log forever."""

    @pytest.fixture
    def settings(self, tmp_path: Path) -> Settings:
        return make_settings(tmp_path, retention_days=0)

    async def test_a_recovery_window_may_start_at_any_past_time(
        self, stubs: Stubs, tokens: Tokens, world: World
    ) -> None:
        """With nothing ever deleted, a window starting ten minutes (or years) ago is taken;
        before, a retention of 0 days refused every window."""
        async with Receiver(SECRET) as receiver:
            log = await create_webhook(stubs, tokens, receiver.url)
            for start in (time.time() - 600, time.time() - 3 * 365 * DAY):
                assert (await log.recover(start)).delivery_count == 0


async def test_a_page_token_of_another_list_is_refused(
    stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """A page token handed to another webhook's log or another filter is INVALID_ARGUMENT on
    page_token, not read as a position there (which could end that list early)."""
    async with Receiver(SECRET) as receiver:
        first = await create_webhook(stubs, tokens, receiver.url)
        other = await create_webhook(stubs, tokens, receiver.url)
        await stubs.events.PublishEvents(
            epb.PublishEventsRequest(events=[event(f"e{i}") for i in range(3)]),
            metadata=tokens.bearer(tokens.service(SCOPE_PUBLISH)),
        )
        await first.settled(3)
        token = (await first.list(page_size=1)).next_page_token
        assert token
        assert len((await first.list(page_size=1, page_token=token)).deliveries) == 1
        for log, fields in (
            (other, {}),
            (first, {"status": webhook_pb2.DELIVERY_STATUS_FAILED}),
            (first, {"event_type": "report.generated"}),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await log.list(page_size=1, page_token=token, **fields)
            error = rich_error(caught.value)
            assert error.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "another list" in error.violations["page_token"]


async def test_only_a_finished_delivery_counts_as_queued_again_by_a_retry(tmp_path: Path) -> None:
    """Retrying a delivery that is still pending makes it due sooner but is not counted as
    queued once more (the metric would overstate the backlog); a failed one is."""
    from test_dispatcher import add_webhook, rows, store_engine, store_publish

    async with store_engine(tmp_path) as resources:
        database = resources.database
        add_webhook(resources, "wh", "http://127.0.0.1:9/hook")
        store_publish(resources, "e1")
        (row,) = rows(resources)

        def retry() -> bool:
            found = database.call(lambda s: outbox.retry_delivery(s, "wh", row.id, time.time()))
            assert found is not None
            return found[2]

        assert retry() is False
        database.call(
            lambda s: s.execute(update(DeliveryRow).values(status="failed", next_attempt_at=None))
        )
        assert retry() is True
        assert retry() is False
