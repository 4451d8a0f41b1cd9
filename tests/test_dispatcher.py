"""The dispatcher: retries, 410, leases, caps, the circuit breaker, wake-ups and shutdown.

Most tests run a real service and real receivers on loopback. Those about what happens to
rows already in the store (leases, paused webhooks, the breaker) drive a ``Dispatcher`` over
a real SQLite store directly, seeding rows through the store's own functions.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import signal
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2
from sqlalchemy import update
from sqlmodel import Session, select

from dembrane.webhooks.auth import SCOPE_PUBLISH
from dembrane.webhooks.delivery.dispatcher import (
    CUT_OFF_ERROR,
    FLUSH_WINDOW_SECONDS,
    LANE_HOLD_FACTOR,
    LOST_RETRIES,
    LOST_RETRY_SECONDS,
    UNSTORABLE_ERROR,
    BreakerSettings,
    CircuitBreaker,
    Dispatcher,
    _Lane,
    suspect_slots,
)
from dembrane.webhooks.delivery.pool import SenderPool
from dembrane.webhooks.delivery.sender import (
    AttemptOutcome,
    OutboundRequest,
    RequestSender,
    Sender,
)
from dembrane.webhooks.delivery.targets import TargetPolicy
from dembrane.webhooks.domain.access import Tier
from dembrane.webhooks.domain.payload import ConversationData, EventData
from dembrane.webhooks.metrics import STATS
from dembrane.webhooks.resources import Resources
from dembrane.webhooks.service import Service
from dembrane.webhooks.store import directory, outbox, webhooks
from dembrane.webhooks.store import journal as journal_module
from dembrane.webhooks.store.database import Database
from dembrane.webhooks.store.journal import OutcomeJournal, read_journal
from dembrane.webhooks.store.publish_queue import PublishQueue
from dembrane.webhooks.store.tables import DeliveryRow, EventRow, WebhookRow
from dembrane.webhooks.v1 import (
    event_pb2,
    webhook_pb2,
)
from dembrane.webhooks.v1 import event_service_pb2 as epb
from dembrane.webhooks.v1 import webhook_service_pb2 as pb

from harness import (
    JWT_SECRET,
    Stubs,
    Tokens,
    World,
    make_settings,
    seed_world,
)
from receiver import Receiver, Reply

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
#: The event type of the tests' webhooks that answer, apart from the hanging ones.
SUMMARIZED = "conversation.summarized"
#: A third event type, for a webhook apart from both.
TRANSCRIBED = "conversation.transcribed"
OCCURRED = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


# -- helpers over the gRPC API -------------------------------------------------------------


async def create_webhook(stubs: Stubs, tokens: Tokens, url: str) -> str:
    response = await stubs.webhooks.CreateWebhook(
        pb.CreateWebhookRequest(
            project_id="p-paid",
            name="Hook",
            url=url,
            events=["conversation.started"],
            secret=SECRET,
        ),
        metadata=tokens.bearer(tokens.user("u-owner")),
    )
    return str(response.webhook.id)


def started(event_id: str) -> event_pb2.Event:
    return event_pb2.Event(
        id=event_id,
        type="conversation.started",
        project_id="p-paid",
        conversation=event_pb2.Conversation(id=f"conv-{event_id}"),
    )


async def publish(stubs: Stubs, tokens: Tokens, *event_ids: str) -> None:
    await stubs.events.PublishEvents(
        epb.PublishEventsRequest(events=[started(e) for e in event_ids]),
        metadata=tokens.bearer(tokens.service(SCOPE_PUBLISH)),
    )


async def only_delivery(stubs: Stubs, tokens: Tokens, webhook_id: str) -> webhook_pb2.Delivery:
    """The webhook's single delivery, with its attempts, once it is no longer pending."""
    md = tokens.bearer(tokens.user("u-owner"))
    for _ in range(500):
        listed = await stubs.webhooks.ListDeliveries(
            pb.ListDeliveriesRequest(project_id="p-paid", webhook_id=webhook_id), metadata=md
        )
        (delivery,) = listed.deliveries
        if delivery.status != webhook_pb2.DELIVERY_STATUS_PENDING:
            got = await stubs.webhooks.GetDelivery(
                pb.GetDeliveryRequest(
                    project_id="p-paid", webhook_id=webhook_id, delivery_id=delivery.id
                ),
                metadata=md,
            )
            return got.delivery
        await asyncio.sleep(0.01)
    raise AssertionError("the delivery stayed pending")


@asynccontextmanager
async def running_service(tmp_path: Path, **overrides: object) -> AsyncIterator[Stubs]:
    """A service with its own settings and the seeded directory; yields its stubs."""
    service = Service(make_settings(tmp_path, **overrides))
    await service.start()
    channel = grpc.aio.insecure_channel(service.grpc_target)
    stubs = Stubs.on(channel)
    try:
        await seed_world(stubs, Tokens(service.settings.jwt_secret or ""))
        yield stubs
    finally:
        await channel.close()
        await service.stop()


# -- helpers over the store ----------------------------------------------------------------


@asynccontextmanager
async def store_engine(tmp_path: Path, **overrides: object) -> AsyncIterator[Resources]:
    """Resources over a fresh SQLite store with one paid project ``p``, without servers.

    Requests go out from the test's process, or from worker processes when the overrides
    ask for ``sender_processes``.
    """
    settings = make_settings(tmp_path, **overrides)
    database = Database(settings.database_url, sqlite_synchronous="NORMAL")
    database.migrate()
    now = time.time()

    def seed(session: Session) -> None:
        directory.upsert_workspace(session, "ws", "Workspace", Tier.CHANGEMAKER, now)
        session.flush()
        directory.upsert_project(session, "p", "ws", "Project", "en", now)

    database.call(seed)
    policy = TargetPolicy(settings.allowed_targets)
    sender: RequestSender
    if settings.sender_processes:
        sender = SenderPool(
            settings.sender_processes,
            connect_timeout=settings.connect_timeout,
            request_timeout=settings.request_timeout,
            allowed_targets=tuple(str(network) for network in settings.allowed_targets),
            max_connections=16,
        )
    else:
        sender = Sender(
            connect_timeout=settings.connect_timeout,
            request_timeout=settings.request_timeout,
            policy=policy,
        )
    await sender.start()
    try:
        yield Resources(settings=settings, database=database, policy=policy, sender=sender)
    finally:
        await sender.close()
        database.close()


def add_webhook(resources: Resources, webhook_id: str, url: str, **fields: object) -> None:
    now = time.time()
    row = WebhookRow(
        id=webhook_id,
        project_id="p",
        name=webhook_id,
        url=url,
        events='["conversation.started"]',
        status="published",
        secret=SECRET,
        created_at=now,
        updated_at=now,
    )
    for key, value in fields.items():
        setattr(row, key, value)
    resources.database.call(lambda s: s.add(row))


def store_publish(
    resources: Resources, *event_ids: str, event_type: str = "conversation.started"
) -> None:
    events = [
        EventData(e, event_type, "p", OCCURRED, ConversationData(f"c-{e}")) for e in event_ids
    ]
    resources.database.call(
        lambda s: outbox.publish_events(
            s, events, now=time.time(), dashboard_base_url="https://d.test"
        )
    )


def set_webhook(resources: Resources, webhook_id: str, **values: object) -> None:
    resources.database.call(
        lambda s: s.execute(update(WebhookRow).where(WebhookRow.id == webhook_id).values(**values))  # type: ignore[arg-type]
    )


def rows(resources: Resources) -> list[DeliveryRow]:
    return list(resources.database.call(lambda s: list(s.scalars(select(DeliveryRow)))))


async def until(check: Callable[[], bool], within: float = 10.0) -> None:
    """Poll ``check`` until it holds; fail after ``within`` seconds."""
    # The store announces no changes, so polling it is the only way to watch it.
    async with asyncio.timeout(within):
        while not check():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def until_held_back(resources: Resources, beyond: float) -> None:
    """Wait until every delivery is back in the store, unleased, due after ``beyond``."""
    await until(
        lambda: all(
            r.lease_owner is None and r.next_attempt_at is not None and r.next_attempt_at > beyond
            for r in rows(resources)
        )
    )


async def warm_up(resources: Resources, webhook_id: str) -> None:
    """Publish the event ``warm`` (once) and wait until its delivery to ``webhook_id`` has
    succeeded: from then on the receiver is known to answer."""
    if not any(r.event_id == "warm" for r in rows(resources)):
        store_publish(resources, "warm")
        resources.wake_dispatcher()
    await until(
        lambda: any(
            r.event_id == "warm" and r.webhook_id == webhook_id and r.status == "succeeded"
            for r in rows(resources)
        )
    )


@asynccontextmanager
async def dispatching(resources: Resources, **options: object) -> AsyncIterator[Dispatcher]:
    dispatcher = Dispatcher(resources, retention=False, **options)  # type: ignore[arg-type]
    await dispatcher.start()
    try:
        yield dispatcher
    finally:
        await dispatcher.stop()


# -- retries, 410, exhaustion --------------------------------------------------------------


async def test_a_receiver_failing_twice_gets_the_same_delivery_three_times(
    stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """Two failures then a 200: three requests with one delivery id and body; three attempts."""
    async with Receiver(SECRET, replies=[500, Reply(502, body=b"bad gateway"), 200]) as receiver:
        hook = await create_webhook(stubs, tokens, receiver.url)
        await publish(stubs, tokens, "evt-retry")
        requests = await receiver.wait_for(3)
        delivery = await only_delivery(stubs, tokens, hook)
    assert len(requests) == 3
    assert {r.headers["X-Dembrane-Delivery"] for r in requests} == {delivery.id}
    assert {r.headers["webhook-id"] for r in requests} == {"evt-retry"}
    assert len({r.body for r in requests}) == 1
    assert all(r.verified for r in requests)
    assert delivery.status == webhook_pb2.DELIVERY_STATUS_SUCCEEDED
    assert delivery.attempt_count == 3
    assert [a.number for a in delivery.attempts] == [1, 2, 3]
    assert [a.status_code for a in delivery.attempts] == [500, 502, 200]
    assert [a.success for a in delivery.attempts] == [False, False, True]
    assert delivery.attempts[1].response_body == "bad gateway"
    assert delivery.attempts[1].error == "The receiver answered with status 502."
    assert delivery.attempts[2].error == ""
    assert all(a.latency.ToNanoseconds() > 0 for a in delivery.attempts)
    times = [a.attempt_time.ToDatetime() for a in delivery.attempts]
    assert times == sorted(times)
    assert delivery.last_status_code == 200


async def test_a_delivery_fails_once_the_schedule_is_used_up(
    stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """With a schedule of three retries, a receiver that always fails gets four attempts."""
    async with Receiver(SECRET, default=500) as receiver:
        hook = await create_webhook(stubs, tokens, receiver.url)
        await publish(stubs, tokens, "evt-doomed")
        delivery = await only_delivery(stubs, tokens, hook)
        await asyncio.sleep(0.05)
        assert len(receiver.requests) == 4
    assert delivery.status == webhook_pb2.DELIVERY_STATUS_FAILED
    assert delivery.attempt_count == 4
    assert delivery.last_error == "The receiver answered with status 500."
    assert not delivery.HasField("next_attempt_time")


async def test_a_410_disables_the_webhook(stubs: Stubs, tokens: Tokens, world: World) -> None:
    """A 410 answer fails the delivery at once, disables the webhook, and stops deliveries."""
    async with Receiver(SECRET, default=410) as receiver:
        hook = await create_webhook(stubs, tokens, receiver.url)
        await publish(stubs, tokens, "evt-gone")
        delivery = await only_delivery(stubs, tokens, hook)
        got = await stubs.webhooks.GetWebhook(
            pb.GetWebhookRequest(project_id="p-paid", webhook_id=hook),
            metadata=tokens.bearer(tokens.user("u-owner")),
        )
        await publish(stubs, tokens, "evt-after")
        await asyncio.sleep(0.1)
        assert len(receiver.requests) == 1
    assert delivery.status == webhook_pb2.DELIVERY_STATUS_FAILED
    assert delivery.attempt_count == 1
    assert got.webhook.status == webhook_pb2.WEBHOOK_STATUS_DISABLED
    assert "410" in got.webhook.disabled_reason


async def test_a_disabled_webhook_moved_to_draft_no_longer_gives_a_reason(
    stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """The disabled reason says why a webhook is disabled: once a person moves it to draft
    (or archives it), the reason is gone with the status."""
    owner = tokens.bearer(tokens.user("u-owner"))
    async with Receiver(SECRET, default=410) as receiver:
        hook = await create_webhook(stubs, tokens, receiver.url)
        await publish(stubs, tokens, "evt-gone")
        await only_delivery(stubs, tokens, hook)
    moved = await stubs.webhooks.UpdateWebhook(
        pb.UpdateWebhookRequest(
            project_id="p-paid",
            webhook_id=hook,
            status=webhook_pb2.WEBHOOK_STATUS_DRAFT,
            update_mask=field_mask_pb2.FieldMask(paths=["status"]),
        ),
        metadata=owner,
    )
    assert moved.webhook.status == webhook_pb2.WEBHOOK_STATUS_DRAFT
    assert moved.webhook.disabled_reason == ""


async def test_a_410_stops_the_rows_already_held_for_the_webhook(tmp_path: Path) -> None:
    """After a 410, the webhook's other due deliveries fail unsent instead of going out."""
    async with store_engine(tmp_path, per_webhook_concurrency=1) as resources:
        async with Receiver(SECRET, default=410) as receiver:
            add_webhook(resources, "wh_gone", receiver.url)
            store_publish(resources, *[f"e{i}" for i in range(5)])
            async with dispatching(resources):
                await until(lambda: all(r.status == "failed" for r in rows(resources)))
            assert len(receiver.requests) == 1
        found = rows(resources)
        assert sum(r.attempt_count for r in found) == 1
        unsent = [r for r in found if r.attempt_count == 0]
        assert len(unsent) == 4
        assert all("410 Gone" in r.last_error and "not sent" in r.last_error for r in unsent)


async def test_five_days_without_success_disables_the_webhook(tmp_path: Path) -> None:
    """A failure after failing for longer than the limit disables the webhook."""
    async with store_engine(tmp_path) as resources:
        async with Receiver(SECRET, default=500) as receiver:
            add_webhook(resources, "wh_dying", receiver.url, failing_since=time.time() - 6 * 86400)
            store_publish(resources, "e1")
            async with dispatching(resources):
                await until(lambda: rows(resources)[0].status == "failed")
        webhook = resources.database.call(lambda s: s.get(WebhookRow, "wh_dying"))
        assert webhook is not None
        assert webhook.status == "disabled"
        assert "5 days" in webhook.disabled_reason
        (row,) = rows(resources)
        assert row.attempt_count == 1
        assert "disabled" in row.last_error


async def test_a_success_clears_the_run_of_failures(tmp_path: Path) -> None:
    """A 2xx answer resets the time a webhook has been failing since."""
    async with store_engine(tmp_path) as resources:
        async with Receiver(SECRET, replies=[500], default=200) as receiver:
            add_webhook(resources, "wh_ok", receiver.url, failing_since=time.time() - 86400)
            store_publish(resources, "e1")
            async with dispatching(resources):
                await until(lambda: rows(resources)[0].status == "succeeded")
        webhook = resources.database.call(lambda s: s.get(WebhookRow, "wh_ok"))
        assert webhook is not None
        assert webhook.failing_since is None
        assert webhook.status == "published"


@pytest.mark.parametrize(
    ("answer", "attempts", "last"),
    [
        (500, 2, "The receiver answered with status 500"),
        (410, 1, "The receiver answered with status 410"),
    ],
    ids=["schedule-used-up", "410"],
)
async def test_a_delivery_that_fails_for_good_says_so_in_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, answer: int, attempts: int, last: str
) -> None:
    """A delivery that fails for good, after its last slot or at a 410, logs one warning
    naming the delivery, event type, webhook, attempts and last error, but no secret or body."""
    caplog.set_level("WARNING", logger="dembrane.webhooks.delivery.dispatcher")
    async with store_engine(tmp_path, retry_schedule=(0.0,)) as resources:
        async with Receiver(SECRET, default=answer) as receiver:
            add_webhook(resources, "wh", receiver.url)
            store_publish(resources, "e1")
            async with dispatching(resources):
                await until(lambda: rows(resources)[0].status == "failed")
            assert len(receiver.requests) == attempts
            body = receiver.requests[0].body.decode()
        (row,) = rows(resources)
    (line,) = [r for r in caplog.records if "failed for good" in r.getMessage()]
    assert line.levelname == "WARNING"
    assert line.getMessage() == (
        f"delivery {row.id} of conversation.started to webhook wh failed for good after "
        f"{attempts} attempt{'' if attempts == 1 else 's'} (last: {last})"
    )
    assert SECRET not in line.getMessage()
    assert body not in line.getMessage()
    assert "c-e1" not in line.getMessage()


# -- attempts the service lost itself -------------------------------------------------------


def worker_pool(resources: Resources) -> SenderPool:
    assert isinstance(resources.sender, SenderPool)
    return resources.sender


async def test_requests_lost_with_a_killed_worker_are_not_blamed_on_the_receiver(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Eight requests out to a slow receiver when their worker process is killed stay in the
    log without an answer, open no breaker, and go again soon rather than a slot of the
    schedule later: each delivery succeeds at its second attempt, having used one slot. The
    metrics count them as lost, apart from the receiver's successes and failures."""
    caplog.set_level("WARNING", logger="dembrane.webhooks.delivery.dispatcher")
    before = (STATS.attempts_lost, STATS.attempts_success, STATS.attempts_failure)
    async with store_engine(
        tmp_path, sender_processes=1, per_webhook_concurrency=8, retry_schedule=(3600.0,)
    ) as resources:
        async with Receiver(SECRET, replies=[Reply(200, delay=30)] * 8) as receiver:
            add_webhook(resources, "wh", receiver.url)
            store_publish(resources, *[f"e{i}" for i in range(8)])
            async with dispatching(resources) as dispatcher:
                await receiver.wait_for(8)
                [pid] = worker_pool(resources).pids
                os.kill(pid, signal.SIGKILL)
                await until(lambda: all(r.status == "succeeded" for r in rows(resources)), 30)
                breaker = dispatcher._lanes["wh"].breaker
                assert (breaker.failures, breaker.open_until) == (0, None)
            assert len(receiver.requests) == 16
        found = rows(resources)
        assert [r.attempt_count for r in found] == [1] * 8
        after = (STATS.attempts_lost, STATS.attempts_success, STATS.attempts_failure)
        assert [a - b for a, b in zip(after, before, strict=True)] == [8, 8, 0]
        logged = resources.database.call(
            lambda s: [outbox.get_delivery(s, "wh", r.id) for r in found]
        )
        for delivery in logged:
            assert delivery is not None
            lost, sent = delivery[1]
            assert (lost.number, lost.status_code, lost.success) == (1, None, False)
            assert "worker process stopped" in lost.error
            assert (sent.number, sent.status_code, sent.success) == (2, 200, True)
    assert not [r for r in caplog.records if "keeps failing" in r.getMessage()]


async def test_a_lost_attempt_takes_no_slot_of_the_schedule_nor_starts_the_failure_clock(
    tmp_path: Path,
) -> None:
    """A request lost with its worker is followed by one that fails; that one waits the
    schedule's first delay, and the webhook counts as failing from it, not from the loss."""
    async with store_engine(
        tmp_path, sender_processes=1, retry_schedule=(60.0, 3600.0), retry_jitter=0.0
    ) as resources:
        async with Receiver(SECRET, replies=[Reply(200, delay=30)], default=500) as receiver:
            add_webhook(resources, "wh", receiver.url)
            store_publish(resources, "e1")
            async with dispatching(resources):
                await receiver.wait_for(1)
                [pid] = worker_pool(resources).pids
                os.kill(pid, signal.SIGKILL)
                await until(
                    lambda: (
                        rows(resources)[0].attempt_count == 1
                        and rows(resources)[0].lease_owner is None
                    ),
                    30,
                )
        (row,) = rows(resources)
        assert row.status == "pending"
        assert row.last_status_code == 500
        numbers = resources.database.call(lambda s: outbox.get_delivery(s, "wh", row.id))
        assert numbers is not None
        assert [a.number for a in numbers[1]] == [1, 2]
        assert row.next_attempt_at is not None
        assert row.last_attempt_at is not None
        assert 60 <= row.next_attempt_at - row.last_attempt_at < 70
        webhook = resources.database.call(lambda s: s.get(WebhookRow, "wh"))
        assert webhook is not None
        assert webhook.failing_since == row.last_attempt_at


async def test_a_delivery_lost_again_and_again_comes_to_an_end(tmp_path: Path) -> None:
    """A delivery's first lost attempts go again after a short pause and take no slot (its
    attempt_count stays, their numbers in the log go on); the ones after take slots like
    failures, so a request that keeps killing its worker fails. The count lives in the
    delivery's row: each attempt here is judged by a new dispatcher (a restart, or another
    replica) claiming the row from the store, and the numbers and the allowance go on."""
    async with store_engine(tmp_path, retry_schedule=(60.0,), retry_jitter=0.0) as resources:
        add_webhook(resources, "wh", "http://127.0.0.1:9/hook")
        store_publish(resources, "e1")
        lost = AttemptOutcome(None, 0.1, "", "Lost.", None, datetime.now(UTC), lost=True)
        waits: list[int] = []
        counts: list[int] = []
        clock = time.time()
        for attempt in range(LOST_RETRIES + 2):
            owner = f"dispatcher-{attempt}"
            (claim,) = resources.database.call(
                lambda s, owner=owner, clock=clock: outbox.claim_due(s, owner, clock, 30.0, 10)
            )
            dispatcher = Dispatcher(resources, retention=False)
            lane = _Lane(BreakerSettings())
            before = time.time()
            result = dispatcher._judge(lane, claim, lost)
            assert (lane.breaker.failures, lane.breaker.open_until) == (0, None)
            resources.database.call(
                lambda s, owner=owner, result=result: outbox.record_results(
                    s, owner, [result], [], time.time(), 0.0
                )
            )
            counts.append(result.attempt_count)
            if result.next_attempt_at is None:
                assert result.status == outbox.DeliveryState.FAILED
                break
            waits.append(round(result.next_attempt_at - before))
            # The row comes due again: the next claim finds it.
            clock = result.next_attempt_at
        assert waits == [round(LOST_RETRY_SECONDS)] * LOST_RETRIES + [60]
        assert counts == [0] * LOST_RETRIES + [1, 2]
        (row,) = rows(resources)
        assert (row.status, row.attempt_count, row.lost_attempts) == ("failed", 2, LOST_RETRIES)
        logged = resources.database.call(lambda s: outbox.get_delivery(s, "wh", row.id))
        assert logged is not None
        assert [a.number for a in logged[1]] == list(range(1, LOST_RETRIES + 3))


# -- webhooks that stopped being published --------------------------------------------------


async def test_deliveries_of_paused_or_disabled_webhooks_are_not_sent(tmp_path: Path) -> None:
    """Rows due for a draft or archived webhook are skipped, for a disabled one failed."""
    async with store_engine(tmp_path) as resources, Receiver(SECRET) as receiver:
        for webhook_id in ("wh_draft", "wh_archived", "wh_disabled"):
            add_webhook(resources, webhook_id, receiver.url)
        store_publish(resources, "e1")
        set_webhook(resources, "wh_draft", status="draft")
        set_webhook(resources, "wh_archived", status="archived")
        set_webhook(resources, "wh_disabled", status="disabled", disabled_reason="Too many errors.")
        async with dispatching(resources):
            await until(lambda: all(r.status != "pending" for r in rows(resources)))
        assert receiver.requests == []
        by_hook = {r.webhook_id: r for r in rows(resources)}
        assert by_hook["wh_draft"].status == "skipped"
        assert by_hook["wh_draft"].skip_reason == (
            "The webhook was draft when the delivery was due, so it was not sent."
        )
        assert by_hook["wh_archived"].status == "skipped"
        assert by_hook["wh_disabled"].status == "failed"
        assert by_hook["wh_disabled"].last_error == (
            "The webhook is disabled (Too many errors), so the delivery was not sent."
        )
        assert all(r.attempt_count == 0 for r in by_hook.values())


async def test_a_claimed_body_is_the_stored_bytes_exactly(tmp_path: Path) -> None:
    """Claims hand the sender each body byte for byte as stored, whatever the bytes: the
    canonical ASCII that publishing writes, UTF-8, NUL and bytes that are not UTF-8."""
    bodies = {
        "e1": b'{"event":"conversation.started","id":"e1","note":"say \\"hi\\"\\n"}',
        "e2": "caf\u00e9 \u20ac \U0001f600".encode(),
        "e3": bytes(range(256)),
    }
    async with store_engine(tmp_path) as resources:
        add_webhook(resources, "wh", "http://127.0.0.1:9/hook")
        store_publish(resources, *bodies)
        for event_id, body in bodies.items():
            resources.database.call(
                lambda s, event_id=event_id, body=body: s.execute(
                    update(EventRow).where(EventRow.id == event_id).values(body=body)  # type: ignore[arg-type]
                )
            )
        claims = resources.database.call(
            lambda s: outbox.claim_due(s, "mine", time.time() + 1, 30.0, 10)
        )
        assert {c.event_id: c.body for c in claims} == bodies


# -- the outcome journal ---------------------------------------------------------------------


def journal_files(prefix: str) -> list[str]:
    return sorted(p.name for p in Path(prefix).parent.glob(Path(prefix).name + ".*"))


async def crash(dispatcher: Dispatcher) -> None:
    """Stop ``dispatcher`` as a killed process stops: nothing more is written to the store."""
    for task in (dispatcher._claim_task, dispatcher._flush_task):
        assert task is not None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await dispatcher._backlog.stop()
    # The process's files close as it dies; what it wrote to them stays.
    assert dispatcher._journal is not None
    dispatcher._journal.seal()


async def test_outcomes_a_crash_kept_from_the_store_are_recorded_at_the_next_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Deliveries answered by their receiver whose outcomes the process died before writing
    are recorded from the journal when the next dispatcher starts: each succeeded with its
    one attempt in the log, and none is sent a second time."""
    caplog.set_level("INFO", logger="dembrane.webhooks.delivery.dispatcher")
    prefix = str(tmp_path / "webhooks.db-outcomes")
    async with store_engine(tmp_path) as resources, Receiver(SECRET) as receiver:
        add_webhook(resources, "wh", receiver.url)
        store_publish(resources, *[f"e{i}" for i in range(5)])
        first = Dispatcher(resources, retention=False, journal=prefix)
        never = asyncio.Event()

        async def dies_before_writing(*_args: object) -> None:
            await never.wait()

        monkeypatch.setattr(first, "_record", dies_before_writing)
        await first.start()
        await receiver.wait_for(5)
        await until(lambda: len(read_journal(prefix)) == 5)
        await crash(first)
        assert all(r.status == "pending" and r.lease_owner == first.owner for r in rows(resources))

        async with dispatching(resources, journal=prefix):
            await asyncio.sleep(0.3)
        assert len(receiver.requests) == 5
        found = rows(resources)
        assert [(r.status, r.attempt_count, r.last_status_code) for r in found] == [
            ("succeeded", 1, 200)
        ] * 5
        for row in found:
            logged = resources.database.call(
                lambda s, row=row: outbox.get_delivery(s, "wh", row.id)
            )
            assert logged is not None
            assert [(a.number, a.status_code, a.success) for a in logged[1]] == [(1, 200, True)]
        assert journal_files(prefix) == []
    assert "recorded 5 delivery outcomes the process before had not written" in caplog.text


async def test_outcomes_the_store_refuses_at_shutdown_wait_in_the_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop while the store takes no outcomes leaves them in the journal, and the next
    start records them: the deliveries are not sent again."""
    prefix = str(tmp_path / "webhooks.db-outcomes")
    async with store_engine(tmp_path) as resources, Receiver(SECRET) as receiver:
        add_webhook(resources, "wh", receiver.url)
        store_publish(resources, "e1", "e2", "e3")
        first = Dispatcher(resources, retention=False, journal=prefix)

        async def refused(*_args: object) -> None:
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(first, "_record", refused)
        await first.start()
        await receiver.wait_for(3)
        await until(lambda: len(read_journal(prefix)) == 3)
        await first.stop()
        assert journal_files(prefix) != []
        assert all(r.status == "pending" for r in rows(resources))

        async with dispatching(resources, journal=prefix):
            await until(lambda: all(r.status == "succeeded" for r in rows(resources)))
            await asyncio.sleep(0.2)
        assert len(receiver.requests) == 3
        assert journal_files(prefix) == []


async def test_full_journal_segments_go_once_the_store_has_their_outcomes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While deliveries flow, a full segment of the journal is sealed and deleted once the
    store has its outcomes, so the journal never holds more than the segment in use and the
    one being written; a stop leaves none. (Segments of a byte make every write fill one.)"""
    monkeypatch.setattr(journal_module, "SEGMENT_BYTES", 1)
    prefix = str(tmp_path / "webhooks.db-outcomes")
    most = 0
    async with store_engine(tmp_path) as resources, Receiver(SECRET) as receiver:
        add_webhook(resources, "wh", receiver.url)
        async with dispatching(resources, journal=prefix) as dispatcher:
            for batch in range(3):
                store_publish(resources, *[f"e{batch}-{i}" for i in range(20)])
                dispatcher._r.wake_dispatcher()

                def recorded(batch: int = batch) -> bool:
                    nonlocal most
                    most = max(most, len(journal_files(prefix)))
                    done = sum(r.status == "succeeded" for r in rows(resources))
                    return done == 20 * (batch + 1)

                await until(recorded)
            await until(lambda: len(journal_files(prefix)) <= 1)
        assert journal_files(prefix) == []
        assert len(receiver.requests) == 60
    assert 1 <= most <= 2


async def test_a_journal_that_cannot_be_written_leaves_delivery_as_it_was(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A journal in a folder that does not exist is given up with one warning; deliveries
    go out and are recorded all the same."""
    caplog.set_level("WARNING", logger="dembrane.webhooks.store.journal")
    prefix = str(tmp_path / "missing" / "webhooks.db-outcomes")
    async with store_engine(tmp_path) as resources, Receiver(SECRET) as receiver:
        add_webhook(resources, "wh", receiver.url)
        store_publish(resources, "e1", "e2")
        async with dispatching(resources, journal=prefix):
            await until(lambda: all(r.status == "succeeded" for r in rows(resources)))
            store_publish(resources, "e3")
            await until(
                lambda: len(rows(resources)) == 3 and rows(resources)[2].status == "succeeded"
            )
    warnings = [
        r for r in caplog.records if "could not write the outcome journal" in r.getMessage()
    ]
    assert len(warnings) == 1
    assert len(receiver.requests) == 3


async def test_replaying_outcomes_writes_each_once_and_only_while_its_lease_holds(
    tmp_path: Path,
) -> None:
    """Replayed outcomes are recorded only for rows still leased to the dispatcher that made
    the attempt and with no later attempt recorded: replaying twice, an outcome of another
    owner's lease, or one the store already has changes nothing."""
    async with store_engine(tmp_path) as resources:
        add_webhook(resources, "wh", "http://127.0.0.1:9/hook")
        store_publish(resources, "e1", "e2", "e3")
        database = resources.database
        now = time.time()
        claims = database.call(lambda s: outbox.claim_due(s, "mine", now + 1, 30.0, 10))
        ids = {c.event_id: c.delivery_id for c in claims}

        def success(event_id: str, number: int = 1) -> outbox.DeliveryResult:
            attempt = outbox.AttemptRecord(
                number=number,
                attempted_at=now + 2,
                status_code=200,
                latency_ms=5.0,
                response_body="ok",
                error="",
                success=True,
            )
            return outbox.DeliveryResult(
                delivery_id=ids[event_id],
                webhook_id="wh",
                status=outbox.DeliveryState.SUCCEEDED,
                attempt_count=1,
                attempts=(attempt,),
            )

        entries = [
            ("mine", success("e1")),
            ("someone-else", success("e2")),
            ("mine", success("e3", 2)),
        ]
        for _ in range(2):
            recorded = database.call(lambda s: outbox.replay_outcomes(s, entries, now + 3, 0.0))
            assert recorded == (1 if _ == 0 else 0)
        statuses = database.call(
            lambda s: {
                r.event_id: (r.status, r.lease_owner) for r in s.scalars(select(DeliveryRow))
            }
        )
        assert statuses == {
            "e1": ("succeeded", None),
            "e2": ("pending", "mine"),
            "e3": ("pending", "mine"),
        }
        attempts = database.call(lambda s: len(outbox.get_delivery(s, "wh", ids["e1"])[1]))  # type: ignore[index]
        assert attempts == 1


def test_a_line_cut_short_by_a_crash_is_left_out_of_the_journal(tmp_path: Path) -> None:
    """A journal read back gives every whole line written and skips a line that does not
    describe an outcome, and a last line the dying process did not finish."""
    prefix = str(tmp_path / "webhooks.db-outcomes")
    journal = OutcomeJournal(prefix, "dsp_1")
    attempt = outbox.AttemptRecord(
        number=1,
        attempted_at=1764331200.123456,
        status_code=503,
        latency_ms=12.5,
        response_body="busy \u00e9",
        error="Receiver answered 503.",
        success=False,
    )
    result = outbox.DeliveryResult(
        delivery_id="dlv_1",
        webhook_id="wh",
        status=outbox.DeliveryState.PENDING,
        attempt_count=1,
        next_attempt_at=1764331205.5,
        attempts=(attempt,),
        last_error="Receiver answered 503.",
    )
    journal.append(result)
    journal.write()
    journal.seal()
    [(_number, path)] = [(p.suffix, p) for p in tmp_path.glob("webhooks.db-outcomes.*")]
    with open(path, "ab") as file:
        file.write(b'["dlv_bad",1]\n["dlv_2","wh","succ')
    assert read_journal(prefix) == [("dsp_1", result)]


def test_answers_with_any_text_come_back_from_the_journal_exactly(tmp_path: Path) -> None:
    """Answers holding line separators other than a newline (U+2028, NEL, form feed), text
    beyond ASCII and a lone surrogate come back from the journal exactly, and a last line cut
    inside a character costs only that line."""
    prefix = str(tmp_path / "webhooks.db-outcomes")
    journal = OutcomeJournal(prefix, "dsp_1")
    bodies = [
        "first\u2028second\u2029third",
        "next\x85line\x0cpage\x1crecord\rreturn",
        "caf\u00e9 \U0001f600 \u4e2d\u6587",
        "lone \udc80 surrogate",
        "\n\n",
    ]
    results = [
        outbox.DeliveryResult(
            delivery_id=f"dlv_{index}",
            webhook_id="wh",
            status=outbox.DeliveryState.PENDING,
            attempt_count=1,
            next_attempt_at=1764331205.5 + index / 3,
            attempts=(
                outbox.AttemptRecord(
                    number=1,
                    attempted_at=1764331200.123456 + index / 7,
                    status_code=500,
                    latency_ms=0.1 + index / 9,
                    response_body=body,
                    error="Receiver answered 500.",
                    success=False,
                ),
            ),
            last_error="Receiver answered 500.",
        )
        for index, body in enumerate(bodies)
    ]
    for result in results:
        journal.append(result)
    journal.write()
    journal.seal()
    [path] = list(tmp_path.glob("webhooks.db-outcomes.*"))
    with open(path, "ab") as file:
        # A line cut in the middle of the two bytes of an "é".
        file.write('["dlv_x","wh","pending",1,null,"caf\u00e9'.encode()[:-1])
    assert read_journal(prefix) == [("dsp_1", result) for result in results]


# -- leases and shutdown ---------------------------------------------------------------------


async def test_a_crashed_dispatchers_rows_come_due_when_its_lease_runs_out(
    tmp_path: Path,
) -> None:
    """Rows leased by a dispatcher that vanished are delivered once the lease has run out."""
    async with store_engine(tmp_path) as resources, Receiver(SECRET) as receiver:
        add_webhook(resources, "wh", receiver.url)
        store_publish(resources, "e1", "e2")
        claimed = resources.database.call(
            lambda s: outbox.claim_due(s, "ghost", time.time(), 0.5, 10)
        )
        assert len(claimed) == 2
        async with dispatching(resources, release_leases_at_start=False):
            await asyncio.sleep(0.2)
            assert receiver.requests == []
            await receiver.wait_for(2)
            await until(lambda: all(r.status == "succeeded" for r in rows(resources)))
        # The vanished dispatcher's late report changes nothing.
        late = outbox.DeliveryResult(
            delivery_id=claimed[0].delivery_id,
            webhook_id="wh",
            status=outbox.DeliveryState.FAILED,
            attempt_count=1,
        )
        effects = resources.database.call(
            lambda s: outbox.record_results(s, "ghost", [late], [], time.time(), 86400)
        )
        assert (effects.stale, effects.gone) == (1, 0)
        assert all(r.status == "succeeded" and r.attempt_count == 1 for r in rows(resources))
        # A report on a delivery deleted with its webhook is told apart from a lost lease.
        resources.database.call(lambda s: webhooks.delete_webhook(s, "wh"))
        gone = dataclasses.replace(late, delivery_id=claimed[1].delivery_id)
        effects = resources.database.call(
            lambda s: outbox.record_results(s, "ghost", [gone], [], time.time(), 86400)
        )
        assert (effects.stale, effects.gone) == (0, 1)


@pytest.mark.sqlite_only
async def test_on_sqlite_a_restart_takes_over_leases_at_once(tmp_path: Path) -> None:
    """On SQLite a starting dispatcher makes rows leased by a previous process due at once."""
    async with store_engine(tmp_path) as resources, Receiver(SECRET) as receiver:
        add_webhook(resources, "wh", receiver.url)
        store_publish(resources, "e1")
        resources.database.call(lambda s: outbox.claim_due(s, "ghost", time.time(), 3600, 10))
        async with dispatching(resources):
            await receiver.wait_for(1)


#: Requests sent from the test's process, and from a sender process (whose answers come back
#: to the dispatcher through a future rather than a task).
SENDERS = pytest.mark.parametrize("processes", [0, 1], ids=["in-process", "sender-process"])


@SENDERS
async def test_stopping_hands_back_work_in_flight(tmp_path: Path, processes: int) -> None:
    """Stop releases rows being sent and rows waiting, due at once, for the next start; the
    requests it cut off are in the log as attempts without an answer."""
    async with store_engine(
        tmp_path, per_webhook_concurrency=2, sender_processes=processes
    ) as resources:
        async with Receiver(SECRET, default=Reply(200, delay=30)) as receiver:
            add_webhook(resources, "wh", receiver.url)
            store_publish(resources, *[f"e{i}" for i in range(6)])
            async with dispatching(resources, drain_timeout=0.1) as dispatcher:
                await receiver.wait_for(2)
                owner = dispatcher.owner
            after_stop = time.time()
        found = rows(resources)
        assert all(r.status == "pending" and r.lease_owner is None for r in found)
        assert all(r.next_attempt_at is not None and r.next_attempt_at <= after_stop for r in found)
        assert sorted(r.attempt_count for r in found) == [0, 0, 0, 0, 1, 1]
        cut_off = [r for r in found if r.attempt_count == 1]
        assert all(r.last_error == CUT_OFF_ERROR for r in cut_off)
        logged = resources.database.call(
            lambda s: [outbox.get_delivery(s, "wh", r.id) for r in cut_off]
        )
        for found_delivery in logged:
            assert found_delivery is not None
            (attempt,) = found_delivery[1]
            assert (attempt.status_code, attempt.error) == (None, CUT_OFF_ERROR)
        assert owner
        async with Receiver(SECRET) as healthy:
            set_webhook(resources, "wh", url=healthy.url)
            async with dispatching(resources, release_leases_at_start=False):
                await healthy.wait_for(6)
                await until(lambda: all(r.status == "succeeded" for r in rows(resources)))


@SENDERS
async def test_a_request_cut_off_by_stopping_does_not_start_the_failure_clock(
    tmp_path: Path, processes: int
) -> None:
    """A request that stopping cuts off is logged, but the webhook does not count as failing
    from it: the service stopped, the receiver did not fail."""
    async with store_engine(tmp_path, sender_processes=processes) as resources:
        async with Receiver(SECRET, default=Reply(200, delay=30)) as receiver:
            add_webhook(resources, "wh", receiver.url)
            store_publish(resources, "e1")
            async with dispatching(resources, drain_timeout=0.1):
                await receiver.wait_for(1)
        (row,) = rows(resources)
        assert (row.attempt_count, row.last_error) == (1, CUT_OFF_ERROR)
        webhook = resources.database.call(lambda s: s.get(WebhookRow, "wh"))
        assert webhook is not None
        assert webhook.failing_since is None


@SENDERS
async def test_stopping_lets_quick_requests_finish(tmp_path: Path, processes: int) -> None:
    """Requests that answer within the drain timeout are recorded, not handed back."""
    async with store_engine(tmp_path, sender_processes=processes) as resources:
        async with Receiver(SECRET, default=Reply(200, delay=0.3)) as receiver:
            add_webhook(resources, "wh", receiver.url)
            store_publish(resources, "e1")
            async with dispatching(resources, drain_timeout=5):
                await receiver.wait_for(1)
        (row,) = rows(resources)
        assert row.status == "succeeded"


# -- wake-ups, batching and concurrency caps ------------------------------------------------


async def test_an_idle_dispatcher_wakes_up_when_work_is_published(tmp_path: Path) -> None:
    """A publish followed by a wake-up is delivered without waiting for the idle timer."""
    async with store_engine(tmp_path) as resources, Receiver(SECRET) as receiver:
        add_webhook(resources, "wh", receiver.url)
        async with dispatching(resources, idle_timeout=60):
            await asyncio.sleep(0.2)  # the dispatcher is asleep now
            store_publish(resources, "e1")
            resources.wake_dispatcher()
            await receiver.wait_for(1, within=5)


async def test_many_deliveries_each_arrive_once(tmp_path: Path) -> None:
    """A burst of 300 events to two webhooks is delivered once per webhook, one attempt each."""
    async with store_engine(tmp_path, max_concurrency=16) as resources:
        async with Receiver(SECRET) as first, Receiver(SECRET) as second:
            add_webhook(resources, "wh_1", first.url)
            add_webhook(resources, "wh_2", second.url)
            ids = [f"e{i}" for i in range(300)]
            store_publish(resources, *ids)
            async with dispatching(resources, batch_size=64):
                await first.wait_for(300)
                await second.wait_for(300)
                await until(lambda: all(r.status == "succeeded" for r in rows(resources)))
            for receiver in (first, second):
                assert sorted(r.headers["webhook-id"] for r in receiver.requests) == sorted(ids)
        assert all(r.attempt_count == 1 for r in rows(resources))


async def test_outcomes_that_finish_during_a_write_wait_for_the_next_window(
    tmp_path: Path,
) -> None:
    """Outcomes trickling in are written a window apart, never in a rushed write of their own."""
    async with store_engine(tmp_path, max_concurrency=64, per_webhook_concurrency=64) as resources:
        database = resources.database
        write_outcomes = database.run_driver
        writes: list[tuple[float, float, int]] = []

        async def slow_recording(
            fn: Callable[..., object], *args: object, relaxed: bool = False
        ) -> object:
            # Slow each outcome write down, so that others finish while it is under way.
            if fn is not outbox.record_results:
                return await write_outcomes(fn, *args, relaxed=relaxed)
            started = time.monotonic()
            await asyncio.sleep(0.03)
            result = await write_outcomes(fn, *args, relaxed=relaxed)
            writes.append((started, time.monotonic(), len(args[1]) + len(args[2])))  # type: ignore[arg-type]
            return result

        database.run_driver = slow_recording  # type: ignore[method-assign,assignment]
        # Forty answers, one every 10 ms: outcomes keep finishing across several writes.
        replies = [Reply(200, delay=0.01 * i) for i in range(40)]
        async with Receiver(SECRET, replies=replies) as receiver:
            add_webhook(resources, "wh", receiver.url)
            store_publish(resources, *[f"e{i}" for i in range(40)])
            async with dispatching(resources):
                await receiver.wait_for(40)
                await until(lambda: all(r.status == "succeeded" for r in rows(resources)))
    assert sum(count for _start, _end, count in writes) == 40
    assert len(writes) >= 3
    gaps = [later[0] - earlier[1] for earlier, later in itertools.pairwise(writes)]
    # Timers may fire a little early; a rushed write would follow at once.
    assert min(gaps) >= FLUSH_WINDOW_SECONDS * 0.8


async def test_an_outcome_that_cannot_be_written_does_not_hold_back_the_others(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """When one delivery's outcome keeps failing to be written, the others' outcomes are
    recorded on their own, and the failing one is given up to its lease (sent again later)."""
    async with store_engine(tmp_path) as resources:
        database = resources.database
        write_outcomes = database.run_driver
        async with Receiver(SECRET) as receiver:
            add_webhook(resources, "wh", receiver.url)
            store_publish(resources, *[f"e{i}" for i in range(5)])
            (poisoned,) = [r.id for r in rows(resources) if r.event_id == "e2"]

            async def failing_for_one(
                fn: Callable[..., object], *args: object, relaxed: bool = False
            ) -> object:
                outcomes = args[1] if fn is outbox.record_results else []
                if any(r.delivery_id == poisoned for r in outcomes):  # type: ignore[attr-defined]
                    raise RuntimeError("this outcome cannot be written")
                return await write_outcomes(fn, *args, relaxed=relaxed)

            database.run_driver = failing_for_one  # type: ignore[method-assign,assignment]
            async with dispatching(resources):
                await receiver.wait_for(5)
                await until(
                    lambda: sum(r.status == "succeeded" for r in rows(resources)) == 4, within=20
                )
            left = {r.id: r for r in rows(resources)}[poisoned]
    assert left.status == "pending"
    assert left.lease_owner is not None
    assert f"could not record the outcome of delivery {poisoned}" in caplog.text


async def test_outcomes_whose_text_the_store_refuses_are_recorded_without_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Attempts whose error text no database takes (a lone surrogate, as undecodable header
    bytes come out of aiohttp) are recorded with a note in its place, and the outcomes
    written with them in one batch are recorded too, rather than all held back."""
    async with store_engine(tmp_path, retry_schedule=(3600.0,)) as resources:
        async with Receiver(SECRET, default=500) as receiver:
            add_webhook(resources, "wh", receiver.url)
            store_publish(resources, *[f"e{i}" for i in range(6)])
            poisoned = {r.id for r in rows(resources) if r.event_id in ("e1", "e2", "e3")}
            real_send = resources.sender.send

            async def send(req: OutboundRequest, *, timestamp: int | None = None) -> object:
                outcome = await real_send(req, timestamp=timestamp)
                if req.delivery_id in poisoned:
                    return replace(outcome, error="A redirect to \udcff\udcfe.")
                return outcome

            resources.sender.send = send  # type: ignore[method-assign,assignment]
            async with dispatching(resources):
                await until(
                    lambda: all(
                        r.attempt_count == 1 and r.lease_owner is None for r in rows(resources)
                    ),
                    within=30,
                )
        found = rows(resources)
        assert all(r.status == "pending" and r.last_status_code == 500 for r in found)
        assert {r.last_error for r in found if r.id in poisoned} == {UNSTORABLE_ERROR}
        assert {r.last_error for r in found if r.id not in poisoned} == {
            "The receiver answered with status 500."
        }
    assert "could not record the outcome" not in caplog.text


def most_started_within(receivers: list[Receiver], window: float) -> int:
    """The most requests that began within any ``window`` seconds."""
    starts = sorted(r.received_at for receiver in receivers for r in receiver.requests)
    return max(
        (sum(1 for t in starts[i:] if t - s < window) for i, s in enumerate(starts)), default=0
    )


async def test_concurrency_is_capped_per_webhook_and_overall(tmp_path: Path) -> None:
    """No webhook has more requests in flight than its cap, nor all receivers that answer
    together than the global cap."""
    async with store_engine(tmp_path, per_webhook_concurrency=2, max_concurrency=3) as resources:
        slow = Reply(200, delay=0.4)
        async with (
            Receiver(SECRET, replies=[200], default=slow) as one,
            Receiver(SECRET, replies=[200], default=slow) as two,
        ):
            add_webhook(resources, "wh_1", one.url)
            add_webhook(resources, "wh_2", two.url)
            async with dispatching(resources):
                # Both answer once (at once), so every later request counts as one to a
                # receiver that answers.
                await warm_up(resources, "wh_1")
                await warm_up(resources, "wh_2")
                one.requests.clear()
                two.requests.clear()
                store_publish(resources, *[f"e{i}" for i in range(6)])
                resources.wake_dispatcher()
                await one.wait_for(6)
                await two.wait_for(6)
            # A request starts only when another has ended, 0.4 s after it started.
            assert most_started_within([one], 0.35) <= 2
            assert most_started_within([two], 0.35) <= 2
            assert most_started_within([one, two], 0.35) <= 3


async def test_a_claim_leases_no_more_than_each_webhooks_room(tmp_path: Path) -> None:
    """With a quota, a claim leases each webhook's rows only up to its room and leaves the
    rest due for a later claim."""
    async with store_engine(tmp_path) as resources:
        add_webhook(resources, "wh_a", "http://127.0.0.1:9/a")
        add_webhook(resources, "wh_b", "http://127.0.0.1:9/b")
        store_publish(resources, *[f"e{i}" for i in range(5)])
        quota = outbox.Quota(per_webhook=3, held={"wh_a": 2})
        claims = resources.database.call(
            lambda s: outbox.claim_due(s, "me", time.time(), 60, 100, quota=quota)
        )
        by_webhook = Counter(claim.webhook_id for claim in claims)
        assert by_webhook == {"wh_a": 1, "wh_b": 3}
        left_due = [r for r in rows(resources) if r.lease_owner is None]
        assert Counter(r.webhook_id for r in left_due) == {"wh_a": 4, "wh_b": 2}


async def test_a_publishing_lease_leaves_room_to_claim_the_next_requests(tmp_path: Path) -> None:
    """While a publishing transaction holds a lease of a whole claim's size, the claim loop
    still leases the rows for the requests after those in flight, so a slot that frees up
    never waits for a claim."""
    async with (
        store_engine(tmp_path, per_webhook_concurrency=4, max_concurrency=4) as resources,
        Receiver(SECRET, default=Reply(200, delay=1.0)) as slow,
    ):
        add_webhook(resources, "wh_slow", slow.url)
        store_publish(resources, *[f"e{i}" for i in range(12)])
        async with dispatching(resources, batch_size=8) as dispatcher:
            # Taken before the claim loop first runs, and never given back.
            lease = dispatcher.lease_request()
            assert lease is not None
            assert lease.limit == 8
            await slow.wait_for(4)
            # Four in flight and the eight after them, beside the eight promised, all
            # leased well before the first requests end.
            await until(
                lambda: sum(r.lease_owner == dispatcher.owner for r in rows(resources)) == 12,
                within=0.8,
            )
            dispatcher.lease_abandoned(lease)


async def test_a_slow_webhook_with_a_backlog_does_not_hold_up_the_others(
    tmp_path: Path,
) -> None:
    """A webhook whose receiver answers, slowly, a long backlog holds only its share of rows
    in memory: a later event for another webhook is sent at once, not after the backlog."""
    async with (
        store_engine(tmp_path, per_webhook_concurrency=2, max_concurrency=8) as resources,
        Receiver(SECRET, default=Reply(200, delay=0.5)) as slow,
        Receiver(SECRET) as quick,
    ):
        add_webhook(resources, "wh_slow", slow.url)
        add_webhook(resources, "wh_quick", quick.url, events=f'["{SUMMARIZED}"]')
        store_publish(resources, *[f"e{i}" for i in range(200)])
        async with dispatching(resources) as dispatcher:
            await slow.wait_for(2)
            # Well under the backlog: the slow lane holds its share, not the whole room.
            assert dispatcher._held <= LANE_HOLD_FACTOR * 2
            finished = EventData(
                "late", "conversation.summarized", "p", OCCURRED, ConversationData("c-late")
            )
            resources.database.call(
                lambda s: outbox.publish_events(
                    s, [finished], now=time.time(), dashboard_base_url="https://d.test"
                )
            )
            resources.wake_dispatcher()
            sent = time.time()
            (request,) = await quick.wait_for(1, within=10)
            waited = request.received_at - sent
        assert len(slow.requests) < 30
    # The slow lane drains 4 rows a second; were its share not bounded, the quick
    # webhook's row would wait behind the rows that filled the dispatcher's memory.
    assert waited < 1.5, waited


async def test_a_receiver_that_never_answers_does_not_hold_up_the_others(
    tmp_path: Path,
) -> None:
    """A hanging receiver takes no more than its own cap of slots (here one: the share of
    receivers not known to answer); the rest flow past it."""
    async with running_service(
        tmp_path, per_webhook_concurrency=2, max_concurrency=3, request_timeout=30
    ) as stubs:
        tokens = Tokens(make_settings(tmp_path).jwt_secret or "")
        async with (
            Receiver(SECRET, default=Reply(200, delay=120)) as dead,
            Receiver(SECRET) as healthy,
        ):
            await create_webhook(stubs, tokens, dead.url)
            await create_webhook(stubs, tokens, healthy.url)
            ids = [f"evt-{i}" for i in range(100)]
            for start in range(0, 100, 20):
                await publish(stubs, tokens, *ids[start : start + 20])
            await healthy.wait_for(100, within=30)
            # The hanging receiver never had more than its cap of requests at once.
            assert 1 <= len(dead.requests) <= 2
            assert sorted(r.headers["webhook-id"] for r in healthy.requests) == sorted(ids)


async def test_many_hanging_webhooks_leave_slots_to_receivers_that_answer(
    tmp_path: Path,
) -> None:
    """Ten new webhooks whose receiver hangs, with more requests between them than there are
    slots, take no more than their share: a webhook known to answer still gets its
    deliveries at once, not after the hanging requests time out."""
    async with (
        store_engine(
            tmp_path, max_concurrency=8, per_webhook_concurrency=2, request_timeout=30
        ) as resources,
        Receiver(SECRET, default=Reply(200, delay=60)) as dead,
        Receiver(SECRET) as healthy,
    ):
        add_webhook(resources, "good", healthy.url, events=f'["{SUMMARIZED}"]')

        store_publish(resources, "warm", event_type=SUMMARIZED)
        async with dispatching(resources, drain_timeout=0.2):
            await healthy.wait_for(1)
            for index in range(10):
                add_webhook(resources, f"dead{index}", dead.url)
            store_publish(resources, *[f"e{i}" for i in range(4)])
            await dead.wait_for(6, within=10)
            store_publish(resources, "g1", "g2", "g3", event_type=SUMMARIZED)
            await healthy.wait_for(4, within=5)
            # Their own slots, and for first requests all but a quarter of the
            # answering receivers' eight.
            assert len(dead.requests) <= suspect_slots(8) + 8 - 2


async def test_hanging_receivers_leave_every_slot_to_receivers_that_answer(
    tmp_path: Path,
) -> None:
    """Requests to receivers that hang take slots of their own: while two of them hang, a
    receiver known to answer still gets as many requests at once as ``max_concurrency``."""
    async with (
        store_engine(
            tmp_path, max_concurrency=4, per_webhook_concurrency=4, request_timeout=30
        ) as resources,
        Receiver(SECRET, default=Reply(200, delay=60)) as dead,
        Receiver(SECRET, replies=[200], default=Reply(200, delay=0.5)) as good,
    ):
        add_webhook(resources, "good", good.url, events=f'["{SUMMARIZED}"]')
        store_publish(resources, "warm", event_type=SUMMARIZED)
        async with dispatching(resources, drain_timeout=0.2):
            await good.wait_for(1)
            add_webhook(resources, "dead0", dead.url)
            add_webhook(resources, "dead1", dead.url)
            store_publish(resources, *[f"e{i}" for i in range(4)])
            resources.wake_dispatcher()
            await dead.wait_for(suspect_slots(4), within=10)
            good.requests.clear()
            store_publish(resources, "g1", "g2", "g3", "g4", event_type=SUMMARIZED)
            resources.wake_dispatcher()
            await good.wait_for(4, within=5)
            assert most_started_within([good], 0.4) == 4
            assert len(dead.requests) == suspect_slots(4)


async def fill_suspect_slots(resources: Resources, dead: Receiver, max_concurrency: int) -> None:
    """Add the webhook ``dead``, whose receiver hangs, and wait until its requests hold every
    slot of receivers not known to answer."""
    slots = suspect_slots(max_concurrency)
    add_webhook(resources, "dead", dead.url)
    store_publish(resources, *[f"dead-{i}" for i in range(slots)])
    resources.wake_dispatcher()
    await dead.wait_for(slots, within=10)


async def test_failing_receivers_take_turns_at_the_slot_of_receivers_not_known_to_answer(
    tmp_path: Path,
) -> None:
    """Two failing webhooks share the one slot of receivers not known to answer: the one kept
    waiting starts as soon as the other's request ends, not after its rows were handed back
    for a second."""
    async with store_engine(
        tmp_path, max_concurrency=2, per_webhook_concurrency=1, request_timeout=30
    ) as resources:
        assert suspect_slots(2) == 1
        slow_failure = Reply(500, delay=0.4)
        async with (
            Receiver(SECRET, default=slow_failure) as one,
            Receiver(SECRET, default=slow_failure) as two,
        ):
            add_webhook(resources, "wh_1", one.url)
            add_webhook(resources, "wh_2", two.url)
            store_publish(resources, *[f"e{i}" for i in range(4)])
            async with dispatching(resources, breaker=BreakerSettings(failure_threshold=100)):
                await one.wait_for(2, within=10)
                await two.wait_for(2, within=10)
            first = min(r.received_at for r in one.requests + two.requests)
            # Turns of 0.4 s: each has its second request by 0.8 s. Kept waiting until its
            # rows were handed back, one would wait over 2 s.
            for receiver in (one, two):
                assert receiver.requests[1].received_at - first < 1.6


async def test_a_new_webhook_kept_waiting_starts_when_an_answering_slot_frees(
    tmp_path: Path,
) -> None:
    """A new webhook's first request, kept waiting while hanging receivers hold their own
    slots and receivers that answer hold all but the reserve of theirs, starts as soon as
    one of those answers."""
    async with (
        store_engine(
            tmp_path, max_concurrency=4, per_webhook_concurrency=3, request_timeout=30
        ) as resources,
        Receiver(SECRET, default=Reply(200, delay=60)) as dead,
    ):
        async with (
            Receiver(SECRET, replies=[200], default=Reply(200, delay=0.6)) as good,
            Receiver(SECRET) as new,
        ):
            add_webhook(resources, "good", good.url, events=f'["{SUMMARIZED}"]')
            store_publish(resources, "warm", event_type=SUMMARIZED)
            async with dispatching(resources, drain_timeout=0.2):
                await good.wait_for(1)
                await fill_suspect_slots(resources, dead, 4)
                add_webhook(resources, "new", new.url, events=f'["{TRANSCRIBED}"]')
                # Three slow requests to the good receiver leave fewer free slots than
                # the reserve kept from new webhooks: the new one waits for an answer.
                store_publish(resources, "g1", "g2", "g3", event_type=SUMMARIZED)
                store_publish(resources, "n1", event_type=TRANSCRIBED)
                published = time.time()
                resources.wake_dispatcher()
                (request,) = await new.wait_for(1, within=10)
        assert len(good.requests) == 4
        # The good receiver answers after 0.6 s. Kept waiting until its row was handed
        # back, the new webhook would wait over 2 s.
        assert request.received_at - published < 1.5


async def test_a_webhook_given_a_new_address_starts_when_an_answering_slot_frees(
    tmp_path: Path,
) -> None:
    """A webhook whose address changed while its row waited for a slot counts as new again:
    with hanging receivers holding their own slots, it takes a slot of receivers that answer
    as soon as enough of those are free, not after its row was handed back."""
    async with (
        store_engine(
            tmp_path, max_concurrency=4, per_webhook_concurrency=4, request_timeout=30
        ) as resources,
        Receiver(SECRET, default=Reply(200, delay=60)) as dead,
    ):
        async with (
            Receiver(SECRET, replies=[200], default=Reply(200, delay=0.8)) as busy,
            Receiver(SECRET) as old,
            Receiver(SECRET) as moved,
        ):
            add_webhook(resources, "busy", busy.url, events=f'["{SUMMARIZED}"]')
            add_webhook(resources, "hook", old.url, events=f'["{TRANSCRIBED}"]')
            store_publish(resources, "warm", event_type=SUMMARIZED)
            store_publish(resources, "warm-hook", event_type=TRANSCRIBED)
            async with dispatching(resources, drain_timeout=0.2):
                await busy.wait_for(1)
                await old.wait_for(1)
                await fill_suspect_slots(resources, dead, 4)
                # Every slot of receivers that answer is taken for 0.8 s; meanwhile the
                # hook's row waits for one, and a new address arrives with its next row.
                store_publish(resources, *[f"b{i}" for i in range(4)], event_type=SUMMARIZED)
                resources.wake_dispatcher()
                await busy.wait_for(5)
                store_publish(resources, "h1", event_type=TRANSCRIBED)
                resources.wake_dispatcher()
                await asyncio.sleep(0.2)
                set_webhook(resources, "hook", url=moved.url, updated_at=time.time())
                store_publish(resources, "h2", event_type=TRANSCRIBED)
                resources.wake_dispatcher()
                freed = busy.requests[-1].received_at + 0.8
                await until(lambda: len(old.requests) + len(moved.requests) >= 3)
        later = sorted(r.received_at for r in old.requests[1:] + moved.requests)
        # Kept waiting for a slot of receivers not known to answer, it would wait until
        # its rows were handed back, over a second later.
        assert later[0] - freed < 0.6


async def test_a_full_dispatcher_sleeps_while_a_cool_down_ends(tmp_path: Path) -> None:
    """A dispatcher with no room left waits to be woken: a breaker's cool-down ending while
    it waits never sets its claim loop spinning and holding up the event loop."""
    async with store_engine(
        tmp_path, per_webhook_concurrency=2, max_concurrency=2, request_timeout=30
    ) as resources:
        failing = Receiver(SECRET, default=500)
        hanging = Receiver(SECRET, default=Reply(200, delay=30))
        await failing.start()
        await hanging.start()
        try:
            add_webhook(resources, "wh_fail", failing.url)
            add_webhook(resources, "wh_hang", hanging.url)
            store_publish(resources, *[f"e{i}" for i in range(10)])
            # The failing webhook's breaker opens at its first answer and cools down for
            # 0.3 s; meanwhile the hanging one fills every slot and the dispatcher's buffer.
            breaker = BreakerSettings(failure_threshold=1, open_seconds=0.3)
            # Every slot may go to receivers not known to answer, so the hanging one fills
            # the dispatcher.
            async with dispatching(
                resources, batch_size=4, breaker=breaker, drain_timeout=0.2, suspect_share=1.0
            ) as dispatcher:
                rounds = 0
                check_lanes = dispatcher._check_lanes

                def counting(now: float, mono: float) -> None:
                    nonlocal rounds
                    rounds += 1
                    check_lanes(now, mono)

                dispatcher._check_lanes = counting  # type: ignore[method-assign]
                await hanging.wait_for(2)
                await asyncio.sleep(1.5)
            # Woken by claims, wake-ups and the lane check every 0.25 s: a few dozen rounds
            # at most. A loop that spun would go round thousands of times.
            assert rounds < 100
        finally:
            await failing.stop()
            await hanging.stop()


# -- the circuit breaker ---------------------------------------------------------------------


async def test_an_open_breaker_holds_deliveries_back_without_using_attempts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """After consecutive failures the webhook's other deliveries wait out the cool-down unsent,
    and the log says so once, naming the webhook and its last failure."""
    caplog.set_level("WARNING", logger="dembrane.webhooks.delivery.dispatcher")
    async with store_engine(tmp_path, per_webhook_concurrency=1) as resources:
        async with Receiver(SECRET, default=500) as receiver:
            add_webhook(resources, "wh", receiver.url)
            store_publish(resources, *[f"e{i}" for i in range(5)])
            breaker = BreakerSettings(failure_threshold=2, open_seconds=30)
            async with dispatching(resources, breaker=breaker):
                await until_held_back(resources, beyond=time.time() + 25)
            assert len(receiver.requests) == 2
        found = rows(resources)
        assert all(r.status == "pending" for r in found)
        assert sum(r.attempt_count for r in found) == 2
        assert sum(1 for r in found if r.attempt_count == 0) == 3
        (line,) = [r.getMessage() for r in caplog.records if "keeps failing" in r.getMessage()]
        assert "webhook wh keeps failing (last: The receiver answered with status 500)" in line


async def test_events_published_during_a_cool_down_are_due_when_it_ends(tmp_path: Path) -> None:
    """A webhook's deliveries published while its breaker is open are written due at the
    cool-down's end, like those it held back when it opened, not due at once where every
    claim until then would walk past them."""
    late_event = EventData("late", "conversation.started", "p", OCCURRED, ConversationData("c"))
    async with (
        store_engine(tmp_path, per_webhook_concurrency=1) as resources,
        Receiver(SECRET, default=500) as receiver,
    ):
        add_webhook(resources, "wh", receiver.url)
        store_publish(resources, "e1", "e2", "e3")
        breaker = BreakerSettings(failure_threshold=2, open_seconds=30)
        async with dispatching(resources, breaker=breaker) as dispatcher:
            await until_held_back(resources, beyond=time.time() + 25)
            held_back = max(r.next_attempt_at or 0.0 for r in rows(resources))
            queue = PublishQueue(
                resources.database, "https://d.test", lambda: None, lambda: dispatcher
            )
            await queue.publish([late_event])
            [late] = [r for r in rows(resources) if r.event_id == "late"]
        assert len(receiver.requests) == 2
    assert late.lease_owner is None
    assert late.next_attempt_at == pytest.approx(held_back, abs=1.0)


async def test_an_outage_is_logged_once_and_its_end_too(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A breaker that opens again after a failed probe says nothing more at WARNING, so a
    receiver behind many webhooks does not flood the log; its recovery is one INFO line."""
    caplog.set_level("DEBUG", logger="dembrane.webhooks.delivery.dispatcher")
    async with (
        store_engine(tmp_path, retry_schedule=(0, 0, 0, 0)) as resources,
        Receiver(SECRET, replies=[500, 500, 500], default=200) as receiver,
    ):
        add_webhook(resources, "wh", receiver.url)
        store_publish(resources, "e1")
        breaker = BreakerSettings(failure_threshold=1, open_seconds=0.1)
        async with dispatching(resources, breaker=breaker):
            await receiver.wait_for(4, within=10)
            await until(lambda: rows(resources)[0].status == "succeeded")
    said = [
        (r.levelname, r.getMessage())
        for r in caplog.records
        if "keeps failing" in r.getMessage() or "answers again" in r.getMessage()
    ]
    assert [level for level, _ in said] == ["WARNING", "DEBUG", "DEBUG", "INFO"]
    assert said[-1][1] == "webhook wh answers again; its held deliveries go out"


def test_the_breaker_opens_probes_and_closes() -> None:
    """Closed until N failures, open for a cool-down, then one probe; success closes it."""
    breaker = CircuitBreaker(BreakerSettings(failure_threshold=3, open_seconds=10))
    for _ in range(2):
        breaker.record(alive=False, now=100)
    assert breaker.may_start(100)
    breaker.record(alive=False, now=100)
    assert breaker.is_open(105)
    assert not breaker.may_start(105)
    assert breaker.may_start(110)
    breaker.started(110)
    assert not breaker.may_start(110)  # one probe at a time
    breaker.record(alive=False, now=111)
    assert breaker.open_until == 131  # a failed probe doubles the cool-down
    breaker.started(131)
    breaker.record(alive=True, now=132)
    assert breaker.open_until is None
    assert breaker.may_start(132)


def test_the_breaker_cool_down_is_bounded() -> None:
    """Repeated failed probes never keep a webhook closed off longer than the maximum."""
    breaker = CircuitBreaker(
        BreakerSettings(failure_threshold=1, open_seconds=10, max_open_seconds=25)
    )
    now = 0.0
    for _ in range(6):
        breaker.record(alive=False, now=now)
        assert breaker.open_until is not None
        assert breaker.open_until - now <= 25
        now = breaker.open_until
        breaker.started(now)


async def _held_in_store(resources: Resources) -> None:
    """Wait until webhook ``wh``'s pending rows wait out a cool-down of minutes in the store
    (not leased, due far ahead)."""
    later = time.time() + 200
    await until(
        lambda: all(
            r.lease_owner is None and (r.next_attempt_at or 0) > later
            for r in rows(resources)
            if r.status == "pending"
        )
    )


def _change_as_a_person(resources: Resources, **values: object) -> None:
    """Change webhook ``wh`` as UpdateWebhook does: its waiting rows come due at once."""
    now = time.time()
    set_webhook(resources, "wh", updated_at=now, **values)
    resources.database.call(lambda s: webhooks.resume_pending(s, "wh", now))
    resources.wake_dispatcher()


async def test_a_new_url_gets_a_fresh_breaker(tmp_path: Path) -> None:
    """Pointing a webhook whose breaker is open at a new address delivers there at once."""
    async with store_engine(tmp_path, per_webhook_concurrency=1) as resources:
        breaker = BreakerSettings(failure_threshold=1, open_seconds=300)
        async with Receiver(SECRET, default=500) as broken, Receiver(SECRET) as fixed:
            add_webhook(resources, "wh", broken.url)
            store_publish(resources, "e1", "e2")
            async with dispatching(resources, breaker=breaker):
                await broken.wait_for(1)
                await _held_in_store(resources)
                _change_as_a_person(resources, url=fixed.url)
                await fixed.wait_for(2)
            assert len(broken.requests) == 1


async def test_a_new_status_ends_the_cool_down_too(tmp_path: Path) -> None:
    """Pausing a webhook whose breaker is open ends its deliveries as skipped at once, the
    ones claims had left in the store included, rather than after the cool-down."""
    async with store_engine(tmp_path, per_webhook_concurrency=1) as resources:
        breaker = BreakerSettings(failure_threshold=1, open_seconds=300)
        async with Receiver(SECRET, default=500) as broken:
            add_webhook(resources, "wh", broken.url)
            store_publish(resources, *[f"e{i}" for i in range(10)])
            async with dispatching(resources, breaker=breaker):
                await broken.wait_for(1)
                await _held_in_store(resources)
                _change_as_a_person(resources, status="draft")
                await until(lambda: all(r.status != "pending" for r in rows(resources)))
            assert len(broken.requests) == 1
        found = rows(resources)
        assert [r.status for r in found] == ["skipped"] * 10


async def test_both_secrets_sign_during_a_rotation(tmp_path: Path) -> None:
    """While the previous secret is in its grace period, a receiver holding it still verifies."""
    old_secret = "whsec_" + "b2xkLXNlY3JldC1vbGQtc2VjcmV0LW9sZA=="
    async with store_engine(tmp_path) as resources, Receiver(old_secret) as receiver:
        add_webhook(
            resources,
            "wh",
            receiver.url,
            previous_secret=old_secret,
            previous_secret_expires_at=time.time() + 3600,
        )
        store_publish(resources, "e1")
        async with dispatching(resources):
            (request,) = await receiver.wait_for(1)
    assert request.standard_signature_ok
    assert len(request.headers["webhook-signature"].split(" ")) == 2
    # The body signatures carry the current secret only.
    assert not request.body_signature_ok


class _DroppingServer:
    """A raw TCP receiver that reads each request and closes the connection unanswered."""

    def __init__(self) -> None:
        self.requests = 0
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await reader.read(65536)
            if not chunk:
                break
            data += chunk
        self.requests += 1
        writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/hook"

    async def __aexit__(self, *_exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def _first_failure(stubs: Stubs, webhook_id: str) -> webhook_pb2.Delivery:
    """The webhook's single delivery once its first attempt is recorded."""
    md = Tokens(JWT_SECRET).bearer(Tokens(JWT_SECRET).user("u-owner"))
    for _ in range(500):
        listed = await stubs.webhooks.ListDeliveries(
            pb.ListDeliveriesRequest(project_id="p-paid", webhook_id=webhook_id), metadata=md
        )
        (delivery,) = listed.deliveries
        if delivery.attempt_count >= 1 and delivery.HasField("next_attempt_time"):
            return delivery
        await asyncio.sleep(0.01)
    raise AssertionError("no attempt was recorded")


@pytest.mark.parametrize("answer", ["503", "503-retry-after-1", "dropped"])
async def test_a_503_or_a_dropped_connection_takes_one_slot_of_the_schedule(
    tmp_path: Path, answer: str
) -> None:
    """A receiver that answers 503 (even asking for a second's pause) or drops the
    connection gets one request, and the next is due after the schedule's first delay: a
    receiver down for a deploy gets the schedule's whole patience, not a burst."""
    dropping = _DroppingServer()
    replies = {
        "503": Reply(503),
        "503-retry-after-1": Reply(503, headers={"Retry-After": "1"}),
    }
    async with (
        running_service(tmp_path, retry_schedule=(60.0, 60.0), retry_jitter=0.0) as stubs,
        Receiver(SECRET, default=replies.get(answer, Reply(200))) as receiver,
        dropping as dropping_url,
    ):
        tokens = Tokens(JWT_SECRET)
        url = dropping_url if answer == "dropped" else receiver.url
        hook = await create_webhook(stubs, tokens, url)
        await publish(stubs, tokens, "evt-unavailable")
        delivery = await _first_failure(stubs, hook)
        await asyncio.sleep(0.3)
        made = dropping.requests if answer == "dropped" else len(receiver.requests)
    assert made == 1
    assert delivery.attempt_count == 1
    assert delivery.status == webhook_pb2.DELIVERY_STATUS_PENDING
    wait = delivery.next_attempt_time.ToNanoseconds() - delivery.last_attempt_time.ToNanoseconds()
    assert 59 <= wait / 1e9 <= 61


async def test_retry_after_postpones_the_next_attempt(
    stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """A 429 with Retry-After schedules the next attempt that far ahead, not at once."""
    async with Receiver(SECRET, default=Reply(429, headers={"Retry-After": "120"})) as receiver:
        hook = await create_webhook(stubs, tokens, receiver.url)
        await publish(stubs, tokens, "evt-busy")
        await receiver.wait_for(1)
        md = tokens.bearer(tokens.user("u-owner"))
        for _ in range(300):
            (delivery,) = (
                await stubs.webhooks.ListDeliveries(
                    pb.ListDeliveriesRequest(project_id="p-paid", webhook_id=hook), metadata=md
                )
            ).deliveries
            if delivery.attempt_count == 1 and delivery.HasField("last_attempt_time"):
                break
            await asyncio.sleep(0.01)
        assert delivery.status == webhook_pb2.DELIVERY_STATUS_PENDING
        wait = (
            delivery.next_attempt_time.ToNanoseconds() - delivery.last_attempt_time.ToNanoseconds()
        )
        assert 119 <= wait / 1e9 <= 121
        assert len(receiver.requests) == 1
