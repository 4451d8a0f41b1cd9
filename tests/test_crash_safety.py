"""Crash safety: a server killed with SIGKILL mid-burst loses no acknowledged event.

The service runs as a real subprocess (``dembrane-webhooks serve``) on a SQLite file (on
PostgreSQL in that lane, with an outcome journal of its own); the test publishes a burst of
1,000 events while a receiver on loopback takes the deliveries, kills the server without
warning, restarts it and waits until every event has arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import text

from dembrane.webhooks.auth import SCOPE_DIRECTORY, SCOPE_PUBLISH
from dembrane.webhooks.store.database import Database
from dembrane.webhooks.v1 import directory_service_pb2 as dpb
from dembrane.webhooks.v1 import (
    directory_service_pb2_grpc,
    event_pb2,
    event_service_pb2_grpc,
    webhook_service_pb2_grpc,
)
from dembrane.webhooks.v1 import event_service_pb2 as epb
from dembrane.webhooks.v1 import webhook_service_pb2 as pb

from harness import JWT_SECRET, Tokens, fresh_database_url
from receiver import Receiver, Reply, unused_port

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
EVENTS = 1000
BATCH = 20
KILL_AFTER_DELIVERIES = 200
PER_WEBHOOK_CONCURRENCY = 8


class ServerProcess:
    """``dembrane-webhooks serve`` in a subprocess, on fresh loopback ports."""

    def __init__(self, database_url: str, log_path: Path) -> None:
        self.grpc_port = unused_port()
        journal: dict[str, str] = {}
        if not database_url.startswith("sqlite"):
            # A replica on PostgreSQL journals only where it is told to.
            journal["WEBHOOKS_OUTCOME_JOURNAL"] = str(log_path.parent / "outcomes")
        self.env = {
            **os.environ,
            **journal,
            "WEBHOOKS_DATABASE_URL": database_url,
            "WEBHOOKS_GRPC_PORT": str(self.grpc_port),
            "WEBHOOKS_HTTP_PORT": str(unused_port()),
            "WEBHOOKS_JWT_SECRET": JWT_SECRET,
            "WEBHOOKS_ALLOWED_TARGETS": "127.0.0.0/8",
            "WEBHOOKS_RETRY_SCHEDULE": "0,0,0",
            "WEBHOOKS_RETRY_JITTER": "0",
            "WEBHOOKS_PER_WEBHOOK_CONCURRENCY": str(PER_WEBHOOK_CONCURRENCY),
            # A lease outlasts a request by at least 5 s: a short one keeps the test quick.
            "WEBHOOKS_REQUEST_TIMEOUT": "2",
            "WEBHOOKS_LEASE_SECONDS": "7",
            "WEBHOOKS_LOG_LEVEL": "WARNING",
        }
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    async def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "dembrane.webhooks.cli",
                "serve",
                env=self.env,
                stdout=log,
                stderr=log,
            )
        await self._wait_until_serving()

    async def _wait_until_serving(self) -> None:
        async with grpc.aio.insecure_channel(self.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for _ in range(300):
                assert self.process is not None
                if self.process.returncode is not None:
                    raise AssertionError(f"the server exited:\n{self.log_path.read_text()}")
                with contextlib.suppress(grpc.aio.AioRpcError):
                    answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                await asyncio.sleep(0.05)
        raise AssertionError(f"the server never became healthy:\n{self.log_path.read_text()}")

    async def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        await self.process.wait()

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 15)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


@contextlib.asynccontextmanager
async def server(database_url: str, log_path: Path) -> AsyncIterator[ServerProcess]:
    running = ServerProcess(database_url, log_path)
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


def event(index: int) -> event_pb2.Event:
    return event_pb2.Event(
        id=f"evt-{index:04d}",
        type="conversation.started",
        project_id="p-crash",
        conversation=event_pb2.Conversation(id=f"conv-{index}"),
    )


async def seed(target: str, tokens: Tokens, url: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        directory = directory_service_pb2_grpc.DirectoryServiceStub(channel)
        md = tokens.bearer(tokens.service(SCOPE_DIRECTORY))
        await directory.UpsertWorkspace(
            dpb.UpsertWorkspaceRequest(workspace_id="ws", name="W", tier="changemaker"),
            metadata=md,
        )
        await directory.UpsertProject(
            dpb.UpsertProjectRequest(
                project_id="p-crash", workspace_id="ws", name="Crash", language="en"
            ),
            metadata=md,
        )
        await directory.SetMembership(
            dpb.SetMembershipRequest(workspace_id="ws", user_id="u-owner", role="owner"),
            metadata=md,
        )
        await webhook_service_pb2_grpc.WebhookServiceStub(channel).CreateWebhook(
            pb.CreateWebhookRequest(
                project_id="p-crash",
                name="Crash",
                url=url,
                events=["conversation.started"],
                secret=SECRET,
            ),
            metadata=tokens.bearer(tokens.user("u-owner")),
        )


async def publish_all(target: str, tokens: Tokens, acked: set[str], *, pace: float) -> None:
    """Publish the burst in batches, noting acknowledged ids, until done or the server dies."""
    md = tokens.bearer(tokens.service(SCOPE_PUBLISH))
    async with grpc.aio.insecure_channel(target) as channel:
        events = event_service_pb2_grpc.EventServiceStub(channel)
        for start in range(0, EVENTS, BATCH):
            batch = [event(i) for i in range(start, start + BATCH)]
            try:
                await events.PublishEvents(epb.PublishEventsRequest(events=batch), metadata=md)
            except grpc.aio.AioRpcError:
                return  # the server is gone; the caller publishes again after the restart
            acked.update(e.id for e in batch)
            # Spread the burst so the kill lands while events are still being published.
            await asyncio.sleep(pace)


def leased_and_stored(database_url: str) -> tuple[int, set[str]]:
    """Deliveries leased when the server died, and the ids of every stored event."""
    database = Database(database_url)
    try:
        with database.engine.connect() as connection:
            leased = connection.execute(
                text(
                    "SELECT COUNT(*) FROM deliveries "
                    "WHERE status = 'pending' AND lease_owner IS NOT NULL"
                )
            ).scalar_one()
            stored = {row[0] for row in connection.execute(text("SELECT id FROM events"))}
    finally:
        database.close()
    return int(leased), stored


@pytest.mark.slow
async def test_a_killed_server_delivers_every_event_after_restarting(tmp_path: Path) -> None:
    """After SIGKILL mid-burst and a restart every event arrives; repeats only of work in
    flight, and the log lists every request but those."""
    database_url = fresh_database_url(tmp_path)
    log_path = tmp_path / "server.log"
    tokens = Tokens(JWT_SECRET)
    acked: set[str] = set()
    # A little latency keeps several requests in flight at the moment of the kill.
    async with Receiver(SECRET, default=Reply(200, delay=0.005)) as receiver:
        first = ServerProcess(database_url, log_path)
        await first.start()
        try:
            await seed(first.target, tokens, receiver.url)
            publisher = asyncio.create_task(publish_all(first.target, tokens, acked, pace=0.03))
            await receiver.wait_for(KILL_AFTER_DELIVERIES, within=30)
            await first.kill()
            await publisher
        finally:
            await first.stop()

        delivered_before = len(receiver.requests)
        leased, stored = leased_and_stored(database_url)
        # Every acknowledged event was durably stored before its call returned.
        assert acked <= stored
        assert len(acked) < EVENTS, "the kill should land in the middle of the burst"
        assert delivered_before < EVENTS

        async with server(database_url, log_path) as second:
            await publish_all(second.target, tokens, set(), pace=0)
            everything = {f"evt-{i:04d}" for i in range(EVENTS)}
            for _ in range(3000):
                if {r.headers["webhook-id"] for r in receiver.requests} >= everything:
                    break
                await asyncio.sleep(0.01)
            received = [r.headers["webhook-id"] for r in receiver.requests]
            assert set(received) == everything
            # Let anything still in flight land before counting repeats.
            await asyncio.sleep(0.3)
            received = [r.headers["webhook-id"] for r in receiver.requests]

    duplicates = len(received) - len(set(received))
    assert duplicates <= leased, (duplicates, leased)
    assert all(r.verified for r in receiver.requests)
    # Outcomes known when the server died were in its journal: the log misses at most the
    # requests it had out then (and those it started in the same instant), not the last
    # moments' worth of answers waiting to be written together.
    recorded = attempts_recorded(database_url)
    assert len(received) - 2 * PER_WEBHOOK_CONCURRENCY <= recorded <= len(received)


def attempts_recorded(database_url: str) -> int:
    database = Database(database_url)
    try:
        with database.engine.connect() as connection:
            return int(connection.execute(text("SELECT COUNT(*) FROM attempts")).scalar_one())
    finally:
        database.close()
