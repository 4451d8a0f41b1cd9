"""Replicas sharing one PostgreSQL database: an API-only replica and a worker replica."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
from sqlalchemy import select, update
from sqlmodel import Session

from dembrane.webhooks.auth import SCOPE_PUBLISH
from dembrane.webhooks.config import Settings
from dembrane.webhooks.delivery.dispatcher import Dispatcher
from dembrane.webhooks.delivery.sender import Sender
from dembrane.webhooks.delivery.targets import TargetPolicy
from dembrane.webhooks.resources import Resources
from dembrane.webhooks.service import Parts, Service
from dembrane.webhooks.store import outbox
from dembrane.webhooks.store.database import Database
from dembrane.webhooks.store.tables import DeliveryRow
from dembrane.webhooks.v1 import (
    event_pb2,
)
from dembrane.webhooks.v1 import event_service_pb2 as epb
from dembrane.webhooks.v1 import webhook_service_pb2 as pb

from harness import Stubs, Tokens, seed_world
from receiver import Receiver

pytestmark = pytest.mark.postgres_only

T = TypeVar("T")


async def test_a_publish_on_one_replica_wakes_the_worker_of_another(
    settings: Settings, tokens: Tokens
) -> None:
    """A worker that would sleep for minutes delivers at once: the publish's NOTIFY wakes it."""
    api = Service(settings, Parts(grpc=True, gateway=False, dispatcher=False))
    await api.start()
    database = Database(settings.database_url)
    policy = TargetPolicy(settings.allowed_targets)
    sender = Sender(connect_timeout=2, request_timeout=5, policy=policy)
    worker_resources = Resources(
        settings=replace(settings), database=database, policy=policy, sender=sender
    )
    worker = Dispatcher(worker_resources, idle_timeout=300.0, retention=False)
    channel = grpc.aio.insecure_channel(api.grpc_target)
    try:
        await worker.start()
        stubs = Stubs.on(channel)
        await seed_world(stubs, tokens)
        async with Receiver() as receiver:
            await stubs.webhooks.CreateWebhook(
                pb.CreateWebhookRequest(
                    project_id="p-paid", name="Hook", url=receiver.url, events=["report.generated"]
                ),
                metadata=tokens.bearer(tokens.user("u-admin")),
            )
            # Let the worker fall asleep with nothing to do first.
            await asyncio.sleep(0.5)
            await stubs.events.PublishEvent(
                epb.PublishEventRequest(
                    event=event_pb2.Event(
                        id="evt-replicated",
                        type="report.generated",
                        project_id="p-paid",
                        report=event_pb2.Report(id="r1", status="published", language="en"),
                    )
                ),
                metadata=tokens.bearer(tokens.service(SCOPE_PUBLISH)),
            )
            (request,) = await receiver.wait_for(1, within=30.0)
            assert request.headers["webhook-id"] == "evt-replicated"
    finally:
        await channel.close()
        await worker.stop()
        await sender.close()
        database.close()
        await api.stop()


def _lease_all(session: Session) -> None:
    """Lease every delivery to another replica for a minute, in ``session``'s transaction."""
    session.execute(
        update(DeliveryRow).values(lease_owner="replica-a", next_attempt_at=time.time() + 60)
    )


def _beside(database: Database, work: Callable[[Session], T]) -> asyncio.Task[T]:
    """Run ``work`` in a transaction of its own on a thread, beside the test's session."""
    return asyncio.create_task(asyncio.to_thread(database.call, work))


async def test_recoveries_racing_on_two_replicas_queue_each_failed_delivery_once(
    tmp_path: Path,
) -> None:
    """A recovery that waited for another's row locks skips the rows that one queued (and a
    dispatcher then leased): it neither counts them nor hands them out to be sent twice."""
    from test_dispatcher import add_webhook, rows, store_engine, store_publish

    async with store_engine(tmp_path) as resources:
        database = resources.database
        add_webhook(resources, "wh", "http://127.0.0.1:9/hook")
        store_publish(resources, "e1", "e2", "e3")
        past = time.time() - 60
        database.call(
            lambda s: s.execute(
                update(DeliveryRow).values(status="failed", next_attempt_at=None, updated_at=past)
            )
        )
        window = (past - 3600, time.time() + 1, time.time())
        with Session(database.engine) as first:
            assert outbox.requeue_failed_batch(first, "wh", *window, time.time(), 100) == 3
            # A dispatcher's lease, before the first recovery commits.
            _lease_all(first)
            second = _beside(
                database,
                lambda s: outbox.requeue_failed_batch(s, "wh", *window, time.time(), 100),
            )
            await asyncio.sleep(0.5)  # the second recovery now waits for the first's locks
            assert not second.done()
            first.commit()
        assert await second == 0
        assert {row.lease_owner for row in rows(resources)} == {"replica-a"}


async def test_holding_back_a_webhook_skips_rows_another_replica_has_locked(
    tmp_path: Path,
) -> None:
    """Holding back a failing webhook's rows never waits for a row another transaction has
    locked (two replicas doing it at once deadlocked): it holds back the others."""
    from test_dispatcher import add_webhook, rows, store_engine, store_publish

    async with store_engine(tmp_path) as resources:
        database = resources.database
        add_webhook(resources, "wh", "http://127.0.0.1:9/hook")
        store_publish(resources, "e1", "e2", "e3")
        locked, *others = sorted(row.id for row in rows(resources))
        until = time.time() + 600
        with Session(database.engine) as other_replica:
            other_replica.execute(
                select(DeliveryRow.id).where(DeliveryRow.id == locked).with_for_update()
            )
            holding = asyncio.to_thread(
                database.call,
                lambda s: outbox.record_results(
                    s, "me", [], [], time.time(), 0, holds=[outbox.HoldBack("wh", until)]
                ),
            )
            await asyncio.wait_for(holding, timeout=5)
        due = {row.id: row.next_attempt_at for row in rows(resources)}
        assert due[locked] != until
        assert all(due[row_id] == until for row_id in others)


async def test_a_retry_waits_for_a_lease_being_taken_and_leaves_that_attempt_alone(
    tmp_path: Path,
) -> None:
    """RetryDelivery on a row a dispatcher is leasing that moment sees the lease once it is
    committed and leaves the delivery to it, rather than handing it out a second time."""
    from test_dispatcher import add_webhook, rows, store_engine, store_publish

    async with store_engine(tmp_path) as resources:
        database = resources.database
        add_webhook(resources, "wh", "http://127.0.0.1:9/hook")
        store_publish(resources, "e1")
        (row,) = rows(resources)
        with Session(database.engine) as dispatcher:
            _lease_all(dispatcher)
            retry = _beside(database, lambda s: outbox.retry_delivery(s, "wh", row.id, time.time()))
            await asyncio.sleep(0.5)
            dispatcher.commit()
        await retry
        (after,) = rows(resources)
        assert after.lease_owner == "replica-a"
        # Still leased: not due again until the lease runs out.
        assert after.next_attempt_at is not None
        assert after.next_attempt_at > time.time() + 30
