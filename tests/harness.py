"""The test harness: settings for a test service, token minting, stubs and a seeded directory.

``conftest.py`` turns these into fixtures; tests import the types from here.
"""

from __future__ import annotations

import ipaddress
import os
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import psycopg

from dembrane.webhooks.auth import SCOPE_DIRECTORY, mint_token
from dembrane.webhooks.config import Settings
from dembrane.webhooks.domain.access import Tier
from dembrane.webhooks.domain.payload import ConversationData, EventData
from dembrane.webhooks.store import directory, outbox, webhooks
from dembrane.webhooks.store.database import Database
from dembrane.webhooks.store.tables import WebhookRow
from dembrane.webhooks.v1 import (
    directory_service_pb2 as dpb,
)
from dembrane.webhooks.v1 import (
    directory_service_pb2_grpc,
    event_service_pb2_grpc,
    webhook_service_pb2_grpc,
)

JWT_SECRET = "test-jwt-secret-of-at-least-32-bytes"


def fresh_database_url(tmp_path: Path) -> str:
    """A fresh, empty database for one test.

    SQLite in the test's temporary folder by default; with ``WEBHOOKS_TEST_BACKEND=postgres``
    (the PostgreSQL lane of ``make test``) a new database on the lane's server.
    """
    if os.environ.get("WEBHOOKS_TEST_BACKEND") == "postgres":
        server = os.environ["WEBHOOKS_TEST_POSTGRES_URL"]
        name = "test_" + uuid.uuid4().hex[:16]
        with psycopg.connect(server, autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return server.rsplit("/", 1)[0] + "/" + name
    return f"sqlite:///{tmp_path / 'webhooks.db'}"


def seed_store(database: Database, project_id: str, webhook_ids: Sequence[str]) -> float:
    """Put a workspace on the webhook tier, ``project_id`` in it and a published webhook per
    id (each subscribed to ``conversation.created``) straight into a migrated store;
    returns the time they were made at (the webhooks' ``updated_at``)."""
    now = time.time()

    def seed(session: Any) -> None:
        workspace_id = f"w-{project_id}"
        directory.upsert_workspace(session, workspace_id, "W", Tier.CHANGEMAKER, now)
        directory.upsert_project(session, project_id, workspace_id, "P", "en", now)
        for webhook_id in webhook_ids:
            webhooks.add_webhook(
                session,
                WebhookRow(
                    id=webhook_id,
                    project_id=project_id,
                    name=webhook_id,
                    url="https://receiver.example/hook",
                    events='["conversation.created"]',
                    status="published",
                    secret="whsec_c2VlZGVkLXN0b3JlLXNpZ25pbmcta2V5",
                    created_at=now,
                    updated_at=now,
                ),
            )

    database.call(seed)
    return now


def publish_created(
    database: Database, project_id: str, numbers: Iterable[int], now: float
) -> None:
    """Publish a ``conversation.created`` event ``evt-<project>-<number>`` per number straight
    into the store, at ``now``, as one publishing transaction."""
    moment = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    events = [
        EventData(
            id=f"evt-{project_id}-{number}",
            type="conversation.created",
            project_id=project_id,
            occurred_at=moment,
            conversation=ConversationData(id=f"conv-{number}"),
        )
        for number in numbers
    ]
    database.call_driver(
        lambda session: outbox.publish_events(
            session, events, now=now, dashboard_base_url="https://dash.example"
        )
    )


def make_settings(tmp_path: Path, **overrides: object) -> Settings:
    """Settings for a test service: loopback targets allowed, retries without waiting."""
    base = Settings(
        grpc_port=0,
        http_port=0,
        bind="127.0.0.1",
        database_url=fresh_database_url(tmp_path),
        jwt_secret=JWT_SECRET,
        allowed_targets=(ipaddress.ip_network("127.0.0.0/8"),),
        retry_schedule=(0, 0, 0),
        retry_jitter=0.0,
        connect_timeout=2.0,
        request_timeout=5.0,
        sqlite_synchronous="NORMAL",
        # Requests go out from the test's own process; test_sender_pool.py covers workers.
        sender_processes=0,
        dashboard_base_url="https://dashboard.example.test",
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


class Tokens:
    """Mints bearer tokens for the test service's HS256 secret."""

    def __init__(self, secret: str) -> None:
        self.secret = secret

    def user(self, user_id: str) -> str:
        return mint_token(self.secret, user_id)

    def staff(self, user_id: str = "u-staff") -> str:
        return mint_token(self.secret, user_id, staff=True)

    def service(self, *scopes: str) -> str:
        return mint_token(self.secret, "svc-backend", scopes=scopes)

    def expired(self, user_id: str) -> str:
        return mint_token(self.secret, user_id, ttl_seconds=-60)

    def bearer(self, token: str) -> tuple[tuple[str, str]]:
        """gRPC call metadata carrying ``token``."""
        return (("authorization", f"Bearer {token}"),)


@dataclass
class Stubs:
    """gRPC stubs on one channel to the test service."""

    channel: grpc.aio.Channel
    webhooks: webhook_service_pb2_grpc.WebhookServiceStub
    events: event_service_pb2_grpc.EventServiceStub
    directory: directory_service_pb2_grpc.DirectoryServiceStub

    @classmethod
    def on(cls, channel: grpc.aio.Channel) -> Stubs:
        """Every service's stub on ``channel``."""
        return cls(
            channel=channel,
            webhooks=webhook_service_pb2_grpc.WebhookServiceStub(channel),
            events=event_service_pb2_grpc.EventServiceStub(channel),
            directory=directory_service_pb2_grpc.DirectoryServiceStub(channel),
        )


@dataclass
class World:
    """The seeded directory: a paid workspace with two projects and a free one."""

    paid_workspace: str = "ws-paid"
    paid_project: str = "p-paid"
    paid_project_2: str = "p-paid-2"
    free_workspace: str = "ws-free"
    free_project: str = "p-free"
    owner: str = "u-owner"
    admin: str = "u-admin"
    member: str = "u-member"
    outsider: str = "u-outsider"


async def seed_world(stubs: Stubs, tokens: Tokens) -> World:
    world = World()
    md = tokens.bearer(tokens.service(SCOPE_DIRECTORY))
    d = stubs.directory
    await d.UpsertWorkspace(
        dpb.UpsertWorkspaceRequest(workspace_id="ws-paid", name="Paid", tier="changemaker"),
        metadata=md,
    )
    await d.UpsertWorkspace(
        dpb.UpsertWorkspaceRequest(workspace_id="ws-free", name="Free", tier="innovator"),
        metadata=md,
    )
    for project_id, workspace_id, name in (
        ("p-paid", "ws-paid", "Paid project"),
        ("p-paid-2", "ws-paid", "Second project"),
        ("p-free", "ws-free", "Free project"),
    ):
        await d.UpsertProject(
            dpb.UpsertProjectRequest(
                project_id=project_id, workspace_id=workspace_id, name=name, language="en"
            ),
            metadata=md,
        )
    for workspace_id, user_id, role in (
        ("ws-paid", "u-owner", "owner"),
        ("ws-paid", "u-admin", "admin"),
        ("ws-paid", "u-member", "member"),
        ("ws-free", "u-outsider", "owner"),
    ):
        await d.SetMembership(
            dpb.SetMembershipRequest(workspace_id=workspace_id, user_id=user_id, role=role),
            metadata=md,
        )
    return world
