"""Replicas sharing one PostgreSQL database: an API-only replica and a worker replica."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import grpc
import pytest

from dembrane.webhooks.auth import SCOPE_PUBLISH
from dembrane.webhooks.config import Settings
from dembrane.webhooks.delivery.dispatcher import Dispatcher
from dembrane.webhooks.delivery.sender import Sender
from dembrane.webhooks.delivery.targets import TargetPolicy
from dembrane.webhooks.resources import Resources
from dembrane.webhooks.service import Parts, Service
from dembrane.webhooks.store.database import Database
from dembrane.webhooks.v1 import (
    event_pb2,
)
from dembrane.webhooks.v1 import event_service_pb2 as epb
from dembrane.webhooks.v1 import webhook_service_pb2 as pb

from harness import Stubs, Tokens, seed_world
from receiver import Receiver

pytestmark = pytest.mark.postgres_only


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
