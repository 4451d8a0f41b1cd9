"""Property-based tests of the REST gateway against its own OpenAPI document.

Schemathesis loads ``/api/openapi.json`` from a running service and, for every operation,
sends requests generated from the document (valid ones and deliberately invalid ones) with
an admin's token. No answer may be a 5xx, and every answer must be documented: its status,
its content type, its headers and its body's schema.

Schemathesis calls synchronously, so the service runs on its own event loop in a thread.
Path parameters are drawn both at random and from ids that exist (the seeded project, a
real webhook and delivery), so the success answers are checked as well as the refusals.
Each operation is one test driven by Hypothesis through ``APIOperation.as_strategy``:
schemathesis' fixture-based ``from_fixture`` loader relies on a pytest internal that the
installed pytest no longer has.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from dembrane.webhooks.auth import SCOPE_PUBLISH
from dembrane.webhooks.gateway.openapi import build_openapi
from dembrane.webhooks.gateway.routes import ROUTES
from dembrane.webhooks.service import Service
from dembrane.webhooks.v1 import (
    event_pb2,
    event_service_pb2,
    webhook_service_pb2,
)

from harness import Stubs, Tokens, make_settings, seed_world
from receiver import Receiver

T = TypeVar("T")

# Bounded so that the whole file stays well under a minute on two cores.
MAX_EXAMPLES = 20

ROUTE_BY_RPC = {route.rpc_name: route for route in ROUTES}
OPERATIONS = [*ROUTE_BY_RPC, "Healthz", "OpenApiDocument"]

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


class ThreadedService:
    """The real service on its own event loop in a thread, seeded with a world to fuzz."""

    def __init__(self, tmp_path: Path) -> None:
        self.settings = make_settings(tmp_path)
        assert self.settings.jwt_secret is not None
        self.tokens = Tokens(self.settings.jwt_secret)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.service = Service(self.settings)
        self.receiver: Receiver | None = None
        self.ids: dict[str, str] = {}

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=60)

    def start(self) -> None:
        self.thread.start()
        self.run(self._start())

    def stop(self) -> None:
        try:
            self.run(self._stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
            self.loop.close()

    async def _start(self) -> None:
        await self.service.start()
        self.receiver = await Receiver().start()
        async with grpc.aio.insecure_channel(self.service.grpc_target) as channel:
            stubs = Stubs.on(channel)
            world = await seed_world(stubs, self.tokens)
            admin = self.tokens.bearer(self.tokens.user(world.admin))
            webhook_ids = []
            for name in ("Fuzzed", "Deleted by the fuzzer"):
                created = await stubs.webhooks.CreateWebhook(
                    webhook_service_pb2.CreateWebhookRequest(
                        project_id=world.paid_project,
                        name=name,
                        url=self.receiver.url,
                        events=["conversation.started"],
                    ),
                    metadata=admin,
                )
                webhook_ids.append(created.webhook.id)
            webhook_id, self.doomed_webhook_id = webhook_ids
            event = event_pb2.Event(
                type="conversation.started",
                project_id=world.paid_project,
                conversation=event_pb2.Conversation(id="conv-fuzz"),
            )
            event.occur_time.FromDatetime(datetime.now(UTC))
            await stubs.events.PublishEvent(
                event_service_pb2.PublishEventRequest(event=event),
                metadata=self.tokens.bearer(self.tokens.service(SCOPE_PUBLISH)),
            )
            listed = await stubs.webhooks.ListDeliveries(
                webhook_service_pb2.ListDeliveriesRequest(
                    project_id=world.paid_project, webhook_id=webhook_id
                ),
                metadata=admin,
            )
        self.ids = {
            "project_id": world.paid_project,
            "webhook_id": webhook_id,
            "delivery_id": listed.deliveries[0].id if listed.deliveries else "dlv_none",
        }
        self.admin_token = self.tokens.user(world.admin)
        self.receiver_url = self.receiver.url

    async def _stop(self) -> None:
        if self.receiver is not None:
            await self.receiver.stop()
        await self.service.stop()


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedService]:
    threaded = ThreadedService(tmp_path_factory.mktemp("schemathesis"))
    threaded.start()
    try:
        yield threaded
    finally:
        threaded.stop()


@pytest.fixture(scope="module")
def api_schema(running: ThreadedService) -> Any:
    config = schemathesis.Config.from_dict(
        {"headers": {"Authorization": f"Bearer {running.admin_token}"}}
    )
    return schemathesis.openapi.from_url(
        f"{running.service.http_url}/api/openapi.json", config=config
    )


# The served document is the one built from the route table: loading it over HTTP above
# and collecting the operations from the table below see the same operations.
def test_served_document_is_the_route_tables(running: ThreadedService, api_schema: Any) -> None:
    assert api_schema.raw_schema == build_openapi(ROUTES)


# Every operation answers only what the document describes, and never a 5xx: for valid
# requests (aimed at random ids and at ids that exist) and for invalid ones.
@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda mode: mode.value)
@pytest.mark.parametrize("operation_id", OPERATIONS)
def test_gateway_conforms_to_its_openapi_document(
    running: ThreadedService, api_schema: Any, operation_id: str, mode: GenerationMode
) -> None:
    operation = api_schema.find_operation_by_id(operation_id)
    route = ROUTE_BY_RPC.get(operation_id)
    if mode is GenerationMode.NEGATIVE and (
        route is None or (route.body != "*" and not route.query_field_names())
    ):
        # An invalid path segment (empty, a dot segment) cannot be sent as that route.
        pytest.skip("only a body or query parameters can be invalid for this operation")
    strategies = [operation.as_strategy(generation_mode=mode)]
    if mode is GenerationMode.POSITIVE and route is not None and route.path_parameters:
        known = {name: running.ids[name] for name in route.path_parameters}
        if operation_id == "DeleteWebhook":
            # Its own webhook, so that the other operations keep theirs.
            known["webhook_id"] = running.doomed_webhook_id
        strategies.append(operation.as_strategy(path_parameters=known))
        if operation_id in ("CreateWebhook", "UpdateWebhook"):
            # Random URLs never reach a receiver; these cases succeed.
            body = {"name": "Fuzzed", "url": running.receiver_url, "events": ["report.generated"]}
            strategies.append(operation.as_strategy(path_parameters=known, body=body))

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],
    )
    @given(case=st.one_of(strategies))
    def conforms(case: schemathesis.Case) -> None:
        case.call_and_validate(base_url=running.service.http_url, checks=CHECKS)

    conforms()
