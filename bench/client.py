"""The load generator's gRPC side: tokens, directory seeding, webhooks, events, publishing.

Seeding goes through the public API (DirectoryService, then WebhookService as a workspace
owner), exactly as the platform's backend and an admin would; only the backlog scenario
writes rows directly, because a million deliveries through the API would measure the API.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime
from types import TracebackType

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.service import JWT_SECRET
from dembrane.webhooks.auth import SCOPE_DIRECTORY, SCOPE_PUBLISH, mint_token
from dembrane.webhooks.delivery.signing import signature_headers, user_agent
from dembrane.webhooks.domain.payload import (
    CONVERSATION_SUMMARIZED,
    ConversationData,
    EventData,
    ProjectInfo,
    render_body,
)
from dembrane.webhooks.v1 import (
    directory_service_pb2,
    directory_service_pb2_grpc,
    event_pb2,
    event_service_pb2,
    event_service_pb2_grpc,
    webhook_service_pb2,
    webhook_service_pb2_grpc,
)

WORKSPACE_ID = "ws-bench"
OWNER_ID = "u-bench-owner"
EVENT_TYPE = CONVERSATION_SUMMARIZED
#: Every benchmark webhook signs with this secret, so the ceiling can sign the same way.
WEBHOOK_SECRET = "whsec_YmVuY2htYXJrLXNpZ25pbmcta2V5LTAx"
DASHBOARD_BASE_URL = "https://dashboard.dembrane.com"

# A transcript and summary of a realistic size: the body of one event is about 1.5 kB.
_TRANSCRIPT = (
    "Host: What would make the neighbourhood greener?\n"
    "Participant: More trees along the canal, and a community garden near the school. "
    "The square by the library is paved from wall to wall; in summer nobody sits there. "
    "If the municipality opened part of it up for planters, neighbours would look after them. "
)
_TRANSCRIPT = _TRANSCRIPT * 3
_SUMMARY = (
    "The participant wants more trees along the canal, a community garden near the school "
    "and planters on the library square, looked after by neighbours."
)
_CREATED = datetime(2026, 11, 28, 11, 46, 0, tzinfo=UTC)
_UPDATED = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)

_MESSAGE_BYTES = 64 * 1024 * 1024


def _timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def make_event(event_id: str, project_id: str) -> event_pb2.Event:
    """A ``conversation.summarized`` event with a transcript and a summary."""
    return event_pb2.Event(
        id=event_id,
        type=EVENT_TYPE,
        project_id=project_id,
        occur_time=_timestamp(_UPDATED),
        conversation=event_pb2.Conversation(
            id=f"conv-{event_id}",
            created_at=_timestamp(_CREATED),
            updated_at=_timestamp(_UPDATED),
            participant_name="Table 4",
            duration=812.4,
            source="PORTAL_AUDIO",
            is_finished=True,
            is_all_chunks_transcribed=True,
            tags=["green spaces", "mobility"],
            transcript=_TRANSCRIPT,
            summary=_SUMMARY,
        ),
    )


def rendered_body(event_id: str, project_id: str) -> bytes:
    """The body the service renders for ``make_event(event_id, project_id)``."""
    event = EventData(
        id=event_id,
        type=EVENT_TYPE,
        project_id=project_id,
        occurred_at=_UPDATED,
        conversation=ConversationData(
            id=f"conv-{event_id}",
            created_at=_CREATED,
            updated_at=_UPDATED,
            participant_name="Table 4",
            duration=812.4,
            source="PORTAL_AUDIO",
            is_finished=True,
            is_all_chunks_transcribed=True,
            tags=("green spaces", "mobility"),
            transcript=_TRANSCRIPT,
            summary=_SUMMARY,
        ),
    )
    project = ProjectInfo(id=project_id, name=f"Project {project_id}", language="en")
    return render_body(event, project, DASHBOARD_BASE_URL)


def signed_request(event_id: str, project_id: str) -> tuple[bytes, dict[str, str]]:
    """The body and headers of one delivery, signed as the service signs them."""
    body = rendered_body(event_id, project_id)
    headers = signature_headers(
        secrets=(WEBHOOK_SECRET,),
        event_type=EVENT_TYPE,
        event_id=event_id,
        delivery_id="dlv_ceiling",
        timestamp=int(time.time()),
        body=body,
        user_agent=user_agent(),
    )
    return body, headers


def _bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


class BenchClient:
    """Stubs on one channel to the service under test, with the tokens each call needs."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.aio.insecure_channel(
            target,
            options=[
                ("grpc.max_send_message_length", _MESSAGE_BYTES),
                ("grpc.max_receive_message_length", _MESSAGE_BYTES),
            ],
        )
        self.events = event_service_pb2_grpc.EventServiceStub(self.channel)
        self.directory = directory_service_pb2_grpc.DirectoryServiceStub(self.channel)
        self.webhooks = webhook_service_pb2_grpc.WebhookServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        ttl = 6 * 3600
        self.publish_md = _bearer(
            mint_token(JWT_SECRET, "svc-bench", scopes=[SCOPE_PUBLISH], ttl_seconds=ttl)
        )
        self.directory_md = _bearer(
            mint_token(JWT_SECRET, "svc-bench", scopes=[SCOPE_DIRECTORY], ttl_seconds=ttl)
        )
        self.owner_md = _bearer(mint_token(JWT_SECRET, OWNER_ID, ttl_seconds=ttl))
        self._workspace_ready = False

    async def close(self) -> None:
        await self.channel.close(grace=None)

    async def __aenter__(self) -> BenchClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def seed_project(self, project_id: str) -> None:
        """A project in a changemaker workspace that the bench's owner manages."""
        if not self._workspace_ready:
            await self.directory.UpsertWorkspace(
                directory_service_pb2.UpsertWorkspaceRequest(
                    workspace_id=WORKSPACE_ID, name="Benchmarks", tier="changemaker"
                ),
                metadata=self.directory_md,
            )
            await self.directory.SetMembership(
                directory_service_pb2.SetMembershipRequest(
                    workspace_id=WORKSPACE_ID, user_id=OWNER_ID, role="owner"
                ),
                metadata=self.directory_md,
            )
            self._workspace_ready = True
        await self.directory.UpsertProject(
            directory_service_pb2.UpsertProjectRequest(
                project_id=project_id,
                workspace_id=WORKSPACE_ID,
                name=f"Project {project_id}",
                language="en",
            ),
            metadata=self.directory_md,
        )

    async def create_webhooks(self, project_id: str, urls: Sequence[str]) -> list[str]:
        """One webhook per URL, subscribed to the bench's event type; returns their ids."""
        ids: list[str] = []
        for index, url in enumerate(urls):
            answer = await self.webhooks.CreateWebhook(
                webhook_service_pb2.CreateWebhookRequest(
                    project_id=project_id,
                    name=f"bench {index}",
                    url=url,
                    events=[EVENT_TYPE],
                    secret=WEBHOOK_SECRET,
                ),
                metadata=self.owner_md,
            )
            ids.append(answer.webhook.id)
        return ids

    async def publish_batch(self, events: Sequence[event_pb2.Event]) -> int:
        """PublishEvents; returns how many deliveries the service queued."""
        answer = await self.events.PublishEvents(
            event_service_pb2.PublishEventsRequest(events=list(events)),
            metadata=self.publish_md,
            timeout=120,
        )
        return sum(result.delivery_count for result in answer.results)

    async def publish_one(self, event: event_pb2.Event) -> int:
        """PublishEvent; returns how many deliveries the service queued."""
        answer = await self.events.PublishEvent(
            event_service_pb2.PublishEventRequest(event=event),
            metadata=self.publish_md,
            timeout=60,
        )
        return int(answer.result.delivery_count)

    async def health_check(self) -> None:
        """The cheapest call the server answers: the transport's own cost."""
        await self.health.Check(health_pb2.HealthCheckRequest(), timeout=10)
