"""The server as operators and tools meet it: reflection, health, start-up and shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from dembrane.webhooks.auth import SCOPE_DIRECTORY, mint_token
from dembrane.webhooks.v1 import (
    directory_service_pb2 as dpb,
)
from dembrane.webhooks.v1 import (
    directory_service_pb2_grpc,
    webhook_service_pb2_grpc,
)
from dembrane.webhooks.v1 import (
    webhook_service_pb2 as pb,
)

from harness import JWT_SECRET, Stubs
from receiver import Receiver, Reply, unused_port


async def _list_services(channel: grpc.aio.Channel) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    async for response in call:
        return {s.name for s in response.list_services_response.service}
    return set()


async def test_reflection_lists_the_services_without_a_token(stubs: Stubs) -> None:
    """Reflection, open to all, lists the three services and health, so grpcurl needs no protos."""
    names = await _list_services(stubs.channel)
    assert {
        "dembrane.webhooks.v1.WebhookService",
        "dembrane.webhooks.v1.EventService",
        "dembrane.webhooks.v1.DirectoryService",
        "grpc.health.v1.Health",
    } <= names


async def test_health_is_serving_without_a_token(stubs: Stubs) -> None:
    """The standard health service answers SERVING for the server and each service."""
    health = health_pb2_grpc.HealthStub(stubs.channel)
    for service in ("", "dembrane.webhooks.v1.WebhookService"):
        response = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING


async def _wait_for_port(port: int, within: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.1)


async def test_sigterm_lets_in_flight_calls_finish(tmp_path: Path) -> None:
    """On SIGTERM the process stops taking calls but the call in flight completes, then exits 0."""
    grpc_port, http_port = unused_port(), unused_port()
    env = {
        **os.environ,
        "WEBHOOKS_DATABASE_URL": f"sqlite:///{tmp_path / 'serve.db'}",
        "WEBHOOKS_GRPC_PORT": str(grpc_port),
        "WEBHOOKS_HTTP_PORT": str(http_port),
        "WEBHOOKS_JWT_SECRET": JWT_SECRET,
        "WEBHOOKS_ALLOWED_TARGETS": "127.0.0.0/8",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dembrane.webhooks.cli",
        "serve",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await _wait_for_port(grpc_port)
        async with Receiver(default=Reply(200, delay=1.5)) as receiver:
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}")
            directory = directory_service_pb2_grpc.DirectoryServiceStub(channel)
            md = (
                (
                    "authorization",
                    "Bearer " + mint_token(JWT_SECRET, "svc", scopes=[SCOPE_DIRECTORY]),
                ),
            )
            await directory.UpsertWorkspace(
                dpb.UpsertWorkspaceRequest(workspace_id="w", tier="changemaker"), metadata=md
            )
            await directory.UpsertProject(
                dpb.UpsertProjectRequest(project_id="p", workspace_id="w"), metadata=md
            )
            await directory.SetMembership(
                dpb.SetMembershipRequest(workspace_id="w", user_id="u", role="owner"), metadata=md
            )
            webhooks = webhook_service_pb2_grpc.WebhookServiceStub(channel)
            user = (("authorization", "Bearer " + mint_token(JWT_SECRET, "u")),)
            created = await webhooks.CreateWebhook(
                pb.CreateWebhookRequest(
                    project_id="p", name="Slow", url=receiver.url, events=["report.generated"]
                ),
                metadata=user,
            )
            in_flight = asyncio.ensure_future(
                webhooks.TestWebhook(
                    pb.TestWebhookRequest(project_id="p", webhook_id=created.webhook.id),
                    metadata=user,
                )
            )
            await receiver.wait_for(1)
            process.send_signal(signal.SIGTERM)
            response = await in_flight
            assert response.success
            await channel.close()
        assert await asyncio.wait_for(process.wait(), timeout=20) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
