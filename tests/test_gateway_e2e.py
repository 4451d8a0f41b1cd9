"""The REST gateway end to end: a real HTTP client, the in-process gateway, the real service.

Every route is called with a request of the contract's shape, and every answer is checked
twice: against the keys and values section 5 of the contract names, and against the
schema the gateway's own OpenAPI document gives for that route and status. The rows of the
error table of section 3 are driven over REST for every route they apply to.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import jsonschema_rs
import jwt
import pytest
from google.rpc import error_details_pb2, status_pb2

from dembrane.webhooks.auth import MAX_AUTHORIZATION_LENGTH, SCOPE_PUBLISH
from dembrane.webhooks.config import Settings
from dembrane.webhooks.gateway.routes import ROUTES, Route
from dembrane.webhooks.service import Service
from dembrane.webhooks.v1 import event_pb2
from dembrane.webhooks.v1 import event_service_pb2 as epb
from dembrane.webhooks.v1 import webhook_service_pb2 as spb

from harness import Stubs, Tokens, World, make_settings
from receiver import Receiver, Reply, unused_port

ROUTE_BY_RPC = {route.rpc_name: route for route in ROUTES}
WEBHOOK_KEYS = {
    "id",
    "name",
    "url",
    "events",
    "status",
    "date_created",
    "date_updated",
    "project_id",
    "disabled_reason",
}
DELIVERY_KEYS = {
    "id",
    "webhook_id",
    "event_id",
    "event_type",
    "status",
    "attempt_count",
    "date_created",
    "next_attempt_at",
    "last_attempt_at",
    "last_status_code",
    "last_error",
    "skip_reason",
    "attempts",
}


@dataclass
class Answer:
    """One HTTP answer: status, parsed JSON body (None when empty) and headers."""

    status: int
    body: Any
    headers: dict[str, str]


@dataclass
class Rest:
    """Calls the gateway by RPC name and checks every answer against the OpenAPI document."""

    http: aiohttp.ClientSession
    url: str
    document: dict[str, Any]
    checked: set[tuple[str, int]] = field(default_factory=set)

    async def call(
        self,
        rpc: str,
        token: str | None,
        *,
        body: Any = None,
        raw: bytes | None = None,
        query: dict[str, str] | None = None,
        **ids: str,
    ) -> Answer:
        route = ROUTE_BY_RPC[rpc]
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        kwargs: dict[str, Any] = {"headers": headers, "params": query or {}}
        if raw is not None:
            kwargs["data"] = raw
            headers["Content-Type"] = "application/json"
        elif body is not None:
            kwargs["json"] = body
        async with self.http.request(
            route.http_method, self.url + route.path.format(**ids), **kwargs
        ) as reply:
            text = await reply.read()
            answer = Answer(
                reply.status,
                None if not text else await reply.json(),
                dict(reply.headers),
            )
        assert answer.status < 500, (rpc, answer.status, answer.body)
        self._check(route, answer)
        return answer

    def _check(self, route: Route, answer: Answer) -> None:
        """The answer's status is documented for the route and its body fits the schema."""
        operation = self.document["paths"][route.path][route.http_method.lower()]
        response = operation["responses"].get(str(answer.status))
        assert response is not None, (route.rpc_name, answer.status, "undocumented status")
        if "$ref" in response:
            response = self.document["components"]["responses"][response["$ref"].rsplit("/", 1)[-1]]
        if "content" not in response:
            assert answer.body is None
        else:
            schema = {
                **response["content"]["application/json"]["schema"],
                "components": self.document["components"],
            }
            jsonschema_rs.validator_for(schema, validate_formats=True).validate(answer.body)
        self.checked.add((route.rpc_name, answer.status))


ORIGIN = "https://dashboard.example.test"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """The shared test settings, with the integrations tab's origin allowed for CORS."""
    return make_settings(tmp_path, cors_origins=(ORIGIN,))


@pytest.fixture
async def rest(service: Service) -> AsyncIterator[Rest]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{service.http_url}/api/openapi.json") as reply:
            assert reply.status == 200
            document = await reply.json()
        yield Rest(http, service.http_url, document)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with Receiver() as running:
        yield running


def _iso(value: str) -> datetime:
    """Parse a timestamp of the API, which is ISO 8601 in UTC."""
    assert value.endswith("Z"), value
    moment = datetime.fromisoformat(value)
    assert moment.utcoffset() == timedelta(0)
    return moment


async def _create(rest: Rest, token: str, project: str, url: str, **extra: Any) -> Answer:
    body = {"name": "Integration", "url": url, "events": ["conversation.started"], **extra}
    created = await rest.call("CreateWebhook", token, body=body, project_id=project)
    assert created.status == 201, created.body
    return created


async def _publish(stubs: Stubs, tokens: Tokens, project: str) -> None:
    occurred = datetime.now(UTC)
    event = event_pb2.Event(
        type="conversation.started",
        project_id=project,
        conversation=event_pb2.Conversation(id="conv-1", is_finished=False),
    )
    event.occur_time.FromDatetime(occurred)
    event.conversation.created_at.FromDatetime(occurred)
    event.conversation.updated_at.FromDatetime(occurred)
    await stubs.events.PublishEvent(
        epb.PublishEventRequest(event=event),
        metadata=tokens.bearer(tokens.service(SCOPE_PUBLISH)),
    )


async def _newest_delivery(
    rest: Rest, token: str, project: str, webhook: str, status: str, *, count: int
) -> list[dict[str, Any]]:
    """Poll the delivery log until it holds ``count`` deliveries, the newest in ``status``."""
    deadline = time.monotonic() + 15.0
    while True:
        listed = await rest.call("ListDeliveries", token, project_id=project, webhook_id=webhook)
        assert listed.status == 200, listed.body
        if len(listed.body) >= count and listed.body[0]["status"] == status:
            return list(listed.body)
        assert time.monotonic() < deadline, listed.body
        await asyncio.sleep(0.05)


# The core routes of section 5, in the order an admin uses them, with the contract's shapes.
async def test_webhook_lifecycle(
    rest: Rest, tokens: Tokens, world: World, receiver: Receiver
) -> None:
    admin = tokens.user(world.admin)
    project = world.paid_project

    created = await _create(rest, admin, project, receiver.url)
    hook = created.body
    assert set(hook) == WEBHOOK_KEYS | {"secret"}
    assert hook["status"] == "published"
    assert hook["events"] == ["conversation.started"]
    assert hook["project_id"] == project
    assert _iso(hook["date_created"]) <= _iso(hook["date_updated"])
    secret = hook.pop("secret")
    assert secret.startswith("whsec_")
    assert len(secret) == len("whsec_") + 32

    second = (await _create(rest, admin, project, receiver.url, secret="my-own-secret")).body
    assert "secret" not in second

    listed = await rest.call("ListWebhooks", admin, project_id=project)
    assert listed.status == 200
    assert isinstance(listed.body, list)
    assert [w["id"] for w in listed.body] == [second["id"], hook["id"]]  # newest first
    assert listed.body[1] == hook

    got = await rest.call("GetWebhook", admin, project_id=project, webhook_id=hook["id"])
    assert (got.status, got.body) == (200, hook)

    patched = await rest.call(
        "UpdateWebhook",
        admin,
        body={"status": "draft", "name": "Renamed"},
        project_id=project,
        webhook_id=hook["id"],
    )
    assert patched.status == 200
    assert set(patched.body) == WEBHOOK_KEYS
    assert (patched.body["status"], patched.body["name"]) == ("draft", "Renamed")
    assert patched.body["url"] == hook["url"]  # not in the body, so not changed
    assert _iso(patched.body["date_updated"]) >= _iso(hook["date_updated"])
    republished = await rest.call(
        "UpdateWebhook",
        admin,
        body={"status": "published"},
        project_id=project,
        webhook_id=hook["id"],
    )
    assert republished.body["status"] == "published"

    shown = await rest.call("GetWebhookSecret", admin, project_id=project, webhook_id=hook["id"])
    assert shown.status == 200
    assert shown.body == {"secret": secret, "previous_secret_expires_at": None}

    rotated = await rest.call(
        "RotateWebhookSecret",
        admin,
        body={"grace_period_seconds": 3600},
        project_id=project,
        webhook_id=hook["id"],
    )
    assert rotated.status == 200
    assert set(rotated.body) == {"secret", "previous_secret_expires_at"}
    assert rotated.body["secret"].startswith("whsec_")
    assert rotated.body["secret"] != secret
    expires = _iso(rotated.body["previous_secret_expires_at"])
    assert timedelta(minutes=59) < expires - datetime.now(UTC) <= timedelta(hours=1)
    chosen = await rest.call(
        "RotateWebhookSecret",
        admin,
        body={"secret": "a-chosen-secret", "grace_period_seconds": 0},
        project_id=project,
        webhook_id=hook["id"],
    )
    assert chosen.body == {"secret": "a-chosen-secret", "previous_secret_expires_at": None}

    exported = await rest.call("ExportWebhook", admin, project_id=project, webhook_id=hook["id"])
    assert exported.status == 200
    assert exported.body == {
        "name": "Renamed",
        "url": receiver.url,
        "events": ["conversation.started"],
    }

    deleted = await rest.call("DeleteWebhook", admin, project_id=project, webhook_id=hook["id"])
    assert (deleted.status, deleted.body) == (204, None)
    gone = await rest.call("GetWebhook", admin, project_id=project, webhook_id=hook["id"])
    assert (gone.status, gone.body) == (404, {"detail": "Webhook not found"} | _extras(gone))


def _extras(answer: Answer) -> dict[str, Any]:
    """The optional keys an error body may carry beside ``detail``."""
    return {k: v for k, v in answer.body.items() if k != "detail"}


# Lists page with page_size, and the X-Next-Page-Token header leads to the next page.
async def test_list_paging(rest: Rest, tokens: Tokens, world: World, receiver: Receiver) -> None:
    admin = tokens.user(world.owner)
    ids = [
        (await _create(rest, admin, world.paid_project, receiver.url)).body["id"] for _ in range(3)
    ]
    first = await rest.call(
        "ListWebhooks", admin, query={"page_size": "2"}, project_id=world.paid_project
    )
    token = first.headers["X-Next-Page-Token"]
    rest_of = await rest.call(
        "ListWebhooks",
        admin,
        query={"page_size": "2", "page_token": token},
        project_id=world.paid_project,
    )
    assert "X-Next-Page-Token" not in rest_of.headers
    assert [w["id"] for w in first.body + rest_of.body] == ids[::-1]


# Without page_size or page_token, the list holds every webhook, beyond the gRPC page of 50,
# as the integrations tab expects: it reads one array and knows no paging.
async def test_an_unpaged_list_holds_every_webhook(
    rest: Rest, tokens: Tokens, world: World, receiver: Receiver
) -> None:
    admin = tokens.user(world.owner)
    ids = [
        (await _create(rest, admin, world.paid_project, receiver.url)).body["id"] for _ in range(53)
    ]
    whole = await rest.call("ListWebhooks", admin, project_id=world.paid_project)
    assert whole.status == 200
    assert "X-Next-Page-Token" not in whole.headers
    assert [w["id"] for w in whole.body] == ids[::-1]
    paged = await rest.call(
        "ListWebhooks", admin, query={"page_token": ""}, project_id=world.paid_project
    )
    assert len(paged.body) == 50
    assert paged.headers["X-Next-Page-Token"]


# Copyable lists the caller's other projects' webhooks with the project name.
async def test_copyable(rest: Rest, tokens: Tokens, world: World, receiver: Receiver) -> None:
    admin = tokens.user(world.admin)
    other = (await _create(rest, admin, world.paid_project_2, receiver.url)).body
    await _create(rest, admin, world.paid_project, receiver.url)
    copyable = await rest.call("ListCopyableWebhooks", admin, project_id=world.paid_project)
    assert copyable.status == 200
    assert copyable.body == [
        {
            "id": other["id"],
            "name": other["name"],
            "url": other["url"],
            "events": other["events"],
            "project_id": world.paid_project_2,
            "project_name": "Second project",
        }
    ]


# The copyable list pages like the webhook list: whole without page_size or page_token
# (beyond gRPC's page of 50), a page at a time with them, leaving no webhook out.
async def test_the_copyable_list_pages_and_is_whole_unpaged(
    rest: Rest, tokens: Tokens, world: World, receiver: Receiver
) -> None:
    admin = tokens.user(world.owner)
    ids = [
        (await _create(rest, admin, world.paid_project_2, receiver.url)).body["id"]
        for _ in range(53)
    ]
    whole = await rest.call("ListCopyableWebhooks", admin, project_id=world.paid_project)
    assert whole.status == 200
    assert "X-Next-Page-Token" not in whole.headers
    assert [w["id"] for w in whole.body] == ids[::-1]
    pages: list[str] = []
    query = {"page_size": "20"}
    while True:
        page = await rest.call(
            "ListCopyableWebhooks", admin, query=query, project_id=world.paid_project
        )
        assert page.status == 200
        assert len(page.body) <= 20
        pages += [w["id"] for w in page.body]
        token = page.headers.get("X-Next-Page-Token")
        if not token:
            break
        query = {"page_size": "20", "page_token": token}
    assert pages == ids[::-1]


# The Test answer of section 5: success, an error status with the body, a failed connection.
async def test_test_action(rest: Rest, tokens: Tokens, world: World, receiver: Receiver) -> None:
    admin = tokens.user(world.admin)
    hook = (await _create(rest, admin, world.paid_project, receiver.url)).body
    ids = {"project_id": world.paid_project, "webhook_id": hook["id"]}

    ok = await rest.call("TestWebhook", admin, **ids)
    assert ok.status == 200
    assert {k: ok.body[k] for k in ("success", "status_code", "message")} == {
        "success": True,
        "status_code": 200,
        "message": "Webhook responded successfully with status 200",
    }
    (request,) = receiver.requests
    assert request.headers["X-Dembrane-Event"] == "webhook.test"

    receiver.respond(Reply(500, b"database down"))
    failed = await rest.call("TestWebhook", admin, **ids)
    assert failed.body["success"] is False
    assert failed.body["status_code"] == 500
    assert failed.body["message"] == "Webhook returned error status 500: database down"

    refused_url = f"http://127.0.0.1:{unused_port()}/hook"
    await rest.call("UpdateWebhook", admin, body={"url": refused_url}, **ids)
    refused = await rest.call("TestWebhook", admin, **ids)
    assert refused.body["success"] is False
    assert refused.body["status_code"] is None
    assert refused.body["message"].startswith("Failed to connect to webhook: ")


# The event-type catalog is a bare array of {name, description, subscribable, example}.
async def test_event_types(rest: Rest, tokens: Tokens, world: World) -> None:
    listed = await rest.call("ListEventTypes", tokens.user(world.member), project_id="p-paid")
    assert listed.status == 200
    by_name = {entry["name"]: entry for entry in listed.body}
    assert set(by_name) >= {
        "conversation.started",
        "conversation.transcribed",
        "conversation.summarized",
        "report.generated",
        "webhook.test",
    }
    assert by_name["webhook.test"]["subscribable"] is False
    assert by_name["conversation.started"]["subscribable"] is True
    for entry in listed.body:
        assert set(entry) == {"name", "description", "subscribable", "example"}
        assert entry["description"]
        assert isinstance(entry["example"], dict)


# The delivery log: a published event shows up, one delivery has its attempts, retry sends
# it again, and recover re-queues the failed ones of a window.
async def test_delivery_log_retry_and_recover(
    rest: Rest, tokens: Tokens, world: World, receiver: Receiver, stubs: Stubs
) -> None:
    admin = tokens.user(world.admin)
    hook = (await _create(rest, admin, world.paid_project, receiver.url)).body
    ids = {"project_id": world.paid_project, "webhook_id": hook["id"]}

    await _publish(stubs, tokens, world.paid_project)
    await receiver.wait_for(1)
    [delivery] = await _newest_delivery(
        rest, admin, world.paid_project, hook["id"], "succeeded", count=1
    )
    assert set(delivery) == DELIVERY_KEYS
    assert [a["status_code"] for a in delivery["attempts"]] == [200]
    assert delivery["event_type"] == "conversation.started"
    assert delivery["last_status_code"] == 200
    assert delivery["attempt_count"] == 1
    _iso(delivery["date_created"])

    filtered = await rest.call("ListDeliveries", admin, query={"status": "failed"}, **ids)
    assert filtered.body == []
    by_type = await rest.call(
        "ListDeliveries", admin, query={"event_type": "conversation.started"}, **ids
    )
    assert [d["id"] for d in by_type.body] == [delivery["id"]]

    one = await rest.call("GetDelivery", admin, delivery_id=delivery["id"], **ids)
    assert one.status == 200
    assert set(one.body) == DELIVERY_KEYS
    [attempt] = one.body["attempts"]
    assert attempt["status_code"] == 200
    assert attempt["success"] is True
    assert isinstance(attempt["latency_ms"], int)
    _iso(attempt["attempted_at"])

    retried = await rest.call("RetryDelivery", admin, delivery_id=delivery["id"], **ids)
    assert retried.status == 200
    assert retried.body["id"] == delivery["id"]
    await receiver.wait_for(2)
    assert receiver.requests[1].headers["X-Dembrane-Delivery"] == delivery["id"]

    # A delivery that fails every attempt, then a recovery of the last hour's failures.
    receiver.default = Reply(500)
    await _publish(stubs, tokens, world.paid_project)
    await _newest_delivery(rest, admin, world.paid_project, hook["id"], "failed", count=2)
    start = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    recovered = await rest.call("RecoverWebhook", admin, body={"start_time": start}, **ids)
    assert recovered.status == 202
    assert set(recovered.body) == {"recovery_id", "delivery_count"}
    assert recovered.body["delivery_count"] >= 1
    assert recovered.body["recovery_id"]


def _sample_body(route: Route) -> dict[str, Any] | None:
    """A well-formed body for the routes that take one."""
    match route.rpc_name:
        case "CreateWebhook":
            return {
                "name": "Integration",
                "url": "https://example.com/hook",
                "events": ["conversation.started"],
            }
        case "UpdateWebhook":
            return {"name": "Renamed"}
        case "RecoverWebhook":
            return {"start_time": datetime.now(UTC).isoformat()}
        case _:
            return {} if route.body == "*" else None


def _ids(route: Route, project: str, webhook: str = "wh_missing") -> dict[str, str]:
    values = {"project_id": project, "webhook_id": webhook, "delivery_id": "dlv_missing"}
    return {name: values[name] for name in route.path_parameters}


# Row 1 of the error table: no token, a malformed one, a badly signed one and an expired one
# all answer 401 {"detail": "Invalid session"} on every route.
async def test_invalid_sessions_are_401(rest: Rest, tokens: Tokens, world: World) -> None:
    forged = Tokens("a-different-secret-of-a-proper-length-for-hs256").user(world.admin)
    for route in ROUTES:
        for token in (None, "not-a-jwt", forged, tokens.expired(world.admin)):
            answer = await rest.call(
                route.rpc_name,
                token,
                body=_sample_body(route),
                **_ids(route, world.paid_project),
            )
            assert answer.status == 401, (route.rpc_name, answer.body)
            assert answer.body["detail"] == "Invalid session"


# Row 2: an unknown project, or one of a workspace the caller is not in, is 404
# "Project not found" on every route.
async def test_unknown_projects_are_404(rest: Rest, tokens: Tokens, world: World) -> None:
    for route in ROUTES:
        for user, project in ((world.admin, "p-nowhere"), (world.outsider, world.paid_project)):
            answer = await rest.call(
                route.rpc_name,
                tokens.user(user),
                body=_sample_body(route),
                **_ids(route, project),
            )
            assert answer.status == 404, (route.rpc_name, answer.body)
            assert answer.body["detail"] == "Project not found"


# Row 3: on a workspace below changemaker, managing webhooks is 403 with the tier sentence.
async def test_tier_too_low_is_403(rest: Rest, tokens: Tokens, world: World) -> None:
    for route in ROUTES:
        if route.rpc_name == "ListEventTypes":
            continue  # reading the catalog needs only to see the project
        answer = await rest.call(
            route.rpc_name,
            tokens.user(world.outsider),
            body=_sample_body(route),
            **_ids(route, world.free_project),
        )
        assert answer.status == 403, (route.rpc_name, answer.body)
        assert answer.body["detail"] == (
            "This action requires the changemaker tier (currently innovator)."
        )
        assert answer.body["reason"] == "TIER_REQUIRED"


# Row 4: a member without the owner or admin role is 403 "Not allowed".
async def test_role_required_is_403(rest: Rest, tokens: Tokens, world: World) -> None:
    for route in ROUTES:
        if route.rpc_name == "ListEventTypes":
            continue
        answer = await rest.call(
            route.rpc_name,
            tokens.user(world.member),
            body=_sample_body(route),
            **_ids(route, world.paid_project),
        )
        assert answer.status == 403, (route.rpc_name, answer.body)
        assert answer.body["detail"] == "Not allowed"
        assert answer.body["reason"] == "ROLE_REQUIRED"


# Row 5: a webhook of another project is 404 "Webhook not found" on every webhook route.
async def test_webhook_of_another_project_is_404(
    rest: Rest, tokens: Tokens, world: World, receiver: Receiver
) -> None:
    admin = tokens.user(world.admin)
    hook = (await _create(rest, admin, world.paid_project, receiver.url)).body
    for route in ROUTES:
        if "webhook_id" not in route.path_parameters or "delivery_id" in route.path_parameters:
            continue
        answer = await rest.call(
            route.rpc_name,
            admin,
            body=_sample_body(route),
            **_ids(route, world.paid_project_2, hook["id"]),
        )
        assert answer.status == 404, (route.rpc_name, answer.body)
        assert answer.body["detail"] == "Webhook not found"


# Row 6: a bad field value is 400 with a clear sentence (and the field it concerns).
@pytest.mark.parametrize(
    ("body", "field_name"),
    [
        ({"events": ["conversation.exploded"]}, "events"),
        ({"events": []}, "events"),
        ({"url": "ftp://example.com/hook"}, "url"),
        ({"url": "not a url"}, "url"),
        ({"name": ""}, "name"),
        ({"secret": "short"}, "secret"),
        ({"status": "paused"}, "status"),
    ],
)
async def test_bad_fields_are_400(
    rest: Rest, tokens: Tokens, world: World, body: dict[str, Any], field_name: str | None
) -> None:
    valid = _sample_body(ROUTE_BY_RPC["CreateWebhook"])
    assert valid is not None
    answer = await rest.call(
        "CreateWebhook",
        tokens.user(world.admin),
        body={**valid, **body},
        project_id=world.paid_project,
    )
    assert answer.status == 400, answer.body
    detail = answer.body["detail"]
    assert detail[:1].isupper(), detail
    assert detail.endswith("."), detail
    if field_name is not None:
        assert field_name in {v["field"] for v in answer.body["field_violations"]}


async def test_server_violations_name_the_field_each_caller_sent(
    rest: Rest, tokens: Tokens, world: World, receiver: Receiver, stubs: Stubs
) -> None:
    """A field the server refuses is named by its REST key over REST (grace_period_seconds)
    and by its proto name over gRPC (grace_period)."""
    admin = tokens.user(world.admin)
    hook = (await _create(rest, admin, world.paid_project, receiver.url)).body
    answer = await rest.call(
        "RotateWebhookSecret",
        admin,
        body={"grace_period_seconds": -5},
        project_id=world.paid_project,
        webhook_id=hook["id"],
    )
    assert answer.status == 400, answer.body
    assert [v["field"] for v in answer.body["field_violations"]] == ["grace_period_seconds"]

    request = spb.RotateWebhookSecretRequest(project_id=world.paid_project, webhook_id=hook["id"])
    request.grace_period.FromSeconds(-5)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stubs.webhooks.RotateWebhookSecret(request, metadata=tokens.bearer(admin))
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    trailer = dict(caught.value.trailing_metadata() or ())["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(trailer)
    bad_request = error_details_pb2.BadRequest()
    assert any(detail.Unpack(bad_request) for detail in status.details)
    assert [v.field for v in bad_request.field_violations] == ["grace_period"]


# Row 7: a malformed body or wrong JSON types is 422, on every route that takes a body.
@pytest.mark.parametrize(
    "raw",
    [
        b"{",
        b"[]",
        b"null",
        b'{"name": 1, "url": "https://example.com", "events": ["conversation.started"]}',
        b'{"name": "n", "url": "https://example.com", "events": "conversation.started"}',
        b'{"name": "n", "url": "https://example.com", "events": [null]}',
        b'{"start_time": 12, "grace_period_seconds": "long", "status": 3}',
    ],
)
async def test_malformed_bodies_are_422(
    rest: Rest, tokens: Tokens, world: World, raw: bytes
) -> None:
    admin = tokens.user(world.admin)
    for route in ROUTES:
        if route.body != "*" or route.rpc_name in ("TestWebhook", "RetryDelivery"):
            continue  # these two take an empty body: their keys are all in the path
        answer = await rest.call(route.rpc_name, admin, raw=raw, **_ids(route, world.paid_project))
        if answer.status == 422:
            assert answer.body["detail"]
            continue
        # A body whose wrong keys this route does not read is not malformed for it.
        assert raw.startswith(b'{"'), (route.rpc_name, raw, answer.status)
        assert answer.status in (400, 404), (route.rpc_name, raw, answer.body)


# A body over 1 MiB is 413, and no bad input ever produces a 5xx (asserted by Rest.call).
async def test_large_body_is_413(rest: Rest, tokens: Tokens, world: World) -> None:
    raw = b'{"name": "' + b"x" * (1024 * 1024 + 1) + b'"}'
    answer = await rest.call(
        "CreateWebhook", tokens.user(world.admin), raw=raw, project_id=world.paid_project
    )
    assert answer.status == 413
    assert answer.body == {
        "detail": "Request body is larger than 1 MiB.",
        "reason": "PAYLOAD_TOO_LARGE",
    }


# HEAD answers as GET would (status and headers), without a body, on every GET route.
async def test_head_answers_like_get(
    rest: Rest, tokens: Tokens, world: World, receiver: Receiver
) -> None:
    admin = tokens.user(world.owner)
    await _create(rest, admin, world.paid_project, receiver.url)
    url = f"{rest.url}/api/projects/{world.paid_project}/webhooks"
    headers = {"Authorization": f"Bearer {admin}"}
    async with rest.http.head(url, headers=headers) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("application/json")
        assert await reply.read() == b""
    async with rest.http.head(url) as reply:
        assert reply.status == 401
    for path in ("/healthz", "/api/openapi.json"):
        async with rest.http.head(f"{rest.url}{path}") as reply:
            assert reply.status == 200


# Staff pass every project check; health and the document need no token.
async def test_staff_health_and_document(rest: Rest, tokens: Tokens, world: World) -> None:
    listed = await rest.call("ListWebhooks", tokens.staff(), project_id=world.paid_project)
    assert listed.status == 200
    async with rest.http.get(f"{rest.url}/healthz") as reply:
        assert reply.status == 200
        assert await reply.json() == {"status": "ok"}
    async with rest.http.get(f"{rest.url}/api/openapi.json") as reply:
        assert reply.status == 200
        assert (await reply.json())["paths"]


# Successful health probes and metrics scrapes stay out of the access log; API calls do not.
async def test_probes_and_scrapes_leave_the_access_log_alone(
    rest: Rest, tokens: Tokens, world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="aiohttp.access")
    # A new connection: the gateway decides whether to log when a connection opens.
    async with aiohttp.ClientSession() as http:
        for path in ("/healthz", "/metrics", "/healthz"):
            async with http.get(f"{rest.url}{path}") as reply:
                assert reply.status == 200
        async with http.get(
            f"{rest.url}/api/projects/{world.paid_project}/webhooks",
            headers={"Authorization": f"Bearer {tokens.staff()}"},
        ) as reply:
            assert reply.status == 200
        async with http.get(f"{rest.url}/healthz/nope") as reply:
            assert reply.status == 404
    logged = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    assert len(logged) == 2, logged
    assert f"/api/projects/{world.paid_project}/webhooks" in logged[0]
    assert "/healthz/nope" in logged[1]


# The service wires its CORS setting into the gateway: the configured origin may call the
# API from a browser, with the page-token header readable, and others may not.
async def test_cors_for_the_configured_origin(rest: Rest, tokens: Tokens, world: World) -> None:
    url = f"{rest.url}/api/projects/{world.paid_project}/webhooks"
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
    async with rest.http.options(url, headers=preflight) as reply:
        assert reply.status == 204
        assert reply.headers["Access-Control-Allow-Origin"] == ORIGIN
        assert "POST" in reply.headers["Access-Control-Allow-Methods"]
        assert "Authorization" in reply.headers["Access-Control-Allow-Headers"]
    headers = {"Origin": ORIGIN, "Authorization": f"Bearer {tokens.user(world.admin)}"}
    async with rest.http.get(url, headers=headers) as reply:
        assert reply.status == 200
        assert reply.headers["Access-Control-Allow-Origin"] == ORIGIN
        assert reply.headers["Access-Control-Expose-Headers"] == "X-Next-Page-Token"
    async with rest.http.get(url, headers={**headers, "Origin": "https://other.test"}) as reply:
        assert "Access-Control-Allow-Origin" not in reply.headers


# Requests the HTTP parser refuses, each with a valid token in a header it cannot parse.
UNPARSEABLE = {
    "control byte": b"Authorization: Bearer {token}\x01\r\n",
    "folded line": b"Authorization: Bearer\r\n {token}\r\n",
    "header over 8 kB": b"Authorization: Bearer {token}" + b"a" * 9000 + b"\r\n",
}


async def _exchange(service: Service, head: bytes, token: str) -> bytes:
    """Send a GET with ``head`` (``{token}`` replaced) among its headers; the whole answer."""
    port = int(service.http_url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        request = b"GET /api/projects/p-paid/webhooks HTTP/1.1\r\nHost: x\r\n"
        writer.write(request + head.replace(b"{token}", token.encode()) + b"\r\n")
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)  # the refusal closes the connection
    finally:
        writer.close()


@pytest.mark.parametrize("head", UNPARSEABLE.values(), ids=UNPARSEABLE.keys())
async def test_a_token_in_an_unparseable_request_stays_out_of_the_log(
    service: Service, tokens: Tokens, caplog: pytest.LogCaptureFixture, head: bytes
) -> None:
    """A valid token in a header the HTTP parser refuses appears in no log line at any level."""
    caplog.set_level("DEBUG")
    token = tokens.staff()
    await _exchange(service, head, token)
    await asyncio.sleep(0.1)
    assert any("is not valid HTTP" in r.getMessage() for r in caplog.records)
    logged = caplog.text + "".join(r.getMessage() for r in caplog.records)
    # The first characters suffice: a header over 8 kB was quoted cut to 100.
    assert token[:40] not in logged


@pytest.mark.parametrize("head", UNPARSEABLE.values(), ids=UNPARSEABLE.keys())
async def test_an_unparseable_request_is_answered_in_json_quoting_nothing(
    service: Service, tokens: Tokens, head: bytes
) -> None:
    """The parser's refusal is a JSON 400 error body with a fixed sentence, not the
    parser's message with the token in it."""
    token = tokens.staff()
    answer = await _exchange(service, head, token)
    head_part, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head_part.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in header_lines)
    assert status_line.split(" ")[1] == "400", status_line
    assert headers["Content-Type"].startswith("application/json")
    assert headers["Cache-Control"] == "no-store"
    refusal = json.loads(body)
    assert set(refusal) == {"detail", "reason"}
    assert refusal["reason"] == "INVALID_ARGUMENT"
    assert token[:40] not in answer.decode("latin-1")


async def test_a_request_that_is_not_valid_http_logs_one_line_without_a_traceback(
    service: Service, caplog: pytest.LogCaptureFixture
) -> None:
    """A header over 8 kB is refused by the HTTP parser before any handler; the log gets
    one INFO line naming the fault, not an ERROR with a traceback."""
    caplog.set_level("INFO", logger="aiohttp.server")
    port = int(service.http_url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 9000 + b"\r\n\r\n")
    await writer.drain()
    status_line = await reader.readline()
    writer.close()
    assert status_line.startswith(b"HTTP/1.1 400") or status_line.startswith(b"HTTP/1.0 400")
    await asyncio.sleep(0.1)
    records = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert records, "the refusal is logged"
    assert all(r.levelname == "INFO" and r.exc_info is None for r in records)
    assert "is not valid HTTP" in records[0].getMessage()


async def test_a_client_gone_in_the_middle_of_its_body_logs_no_error(
    service: Service, tokens: Tokens, caplog: pytest.LogCaptureFixture
) -> None:
    """A caller that closes its connection after part of the body it announced is the
    caller's fault: one INFO line, no ERROR and no traceback."""
    caplog.set_level("INFO")
    port = int(service.http_url.rsplit(":", 1)[1])
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /api/projects/p-paid/webhooks HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer " + tokens.staff().encode() + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{}"
    )
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.close()
    await asyncio.sleep(0.3)
    gone = [r for r in caplog.records if "connection ended before the request" in r.getMessage()]
    assert len(gone) == 1
    assert gone[0].levelname == "INFO"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def _values_around_the_limit(secret: str, user: str) -> tuple[str, str]:
    """The longest authorization value of a valid token within the limit, and the shortest
    beyond it (a JWT cannot have every length, so neither need be at the limit exactly)."""
    expires = int(time.time()) + 600

    def value(pad: int) -> str:
        claims = {"sub": user, "exp": expires, "pad": "x" * pad}
        return "Bearer " + jwt.encode(claims, secret, algorithm="HS256")

    pad = MAX_AUTHORIZATION_LENGTH * 3 // 4 - 200
    while len(value(pad + 1)) <= MAX_AUTHORIZATION_LENGTH:
        pad += 1
    within, beyond = value(pad), value(pad + 1)
    assert len(within) > MAX_AUTHORIZATION_LENGTH - 8
    assert len(beyond) > MAX_AUTHORIZATION_LENGTH
    return within, beyond


async def test_rest_and_grpc_take_the_same_longest_authorization(
    rest: Rest, stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """A valid token just within the documented limit works over REST and gRPC, and one just
    beyond it is an invalid session over both."""
    within, beyond = _values_around_the_limit(tokens.secret, world.admin)
    url = f"{rest.url}/api/projects/{world.paid_project}/webhooks"
    request = spb.ListWebhooksRequest(project_id=world.paid_project)
    async with rest.http.get(url, headers={"Authorization": within}) as reply:
        assert reply.status == 200, await reply.text()
    await stubs.webhooks.ListWebhooks(request, metadata=(("authorization", within),))
    async with rest.http.get(url, headers={"Authorization": beyond}) as reply:
        assert reply.status == 401
        assert (await reply.json())["detail"] == "Invalid session"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stubs.webhooks.ListWebhooks(request, metadata=(("authorization", beyond),))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_several_authorization_headers_are_an_invalid_session(
    rest: Rest, stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """Two Authorization headers (REST) or authorization entries (gRPC) are refused as an
    invalid session, whichever comes first and whether or not both are valid."""
    member, admin = tokens.user(world.member), tokens.user(world.admin)
    url = f"{rest.url}/api/projects/{world.paid_project}/webhooks"
    request = spb.ListWebhooksRequest(project_id=world.paid_project)
    for first, second in ((member, admin), (admin, "bad"), (admin, admin)):
        pair = [("Authorization", f"Bearer {first}"), ("Authorization", f"Bearer {second}")]
        async with rest.http.get(url, headers=pair) as reply:
            assert reply.status == 401
            body = await reply.json()
        assert (body["detail"], body["reason"]) == ("Invalid session", "UNAUTHENTICATED")
        assert body["field_violations"][0]["field"] == "Authorization"
        assert "more than one" in body["field_violations"][0]["description"]
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stubs.webhooks.ListWebhooks(request, metadata=[(k.lower(), v) for k, v in pair])
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "more than one" in (refused.value.details() or "")


async def test_api_answers_are_never_stored_by_caches(
    rest: Rest, tokens: Tokens, world: World, receiver: Receiver
) -> None:
    """Every API answer, those with a signing secret and errors included, and the health
    probe carry Cache-Control: no-store; the OpenAPI document may be cached."""
    admin, project = tokens.user(world.admin), world.paid_project
    created = await _create(rest, admin, project, receiver.url)
    assert created.body["secret"].startswith("whsec_")
    ids = {"project_id": project, "webhook_id": created.body["id"]}
    answers = [
        created,
        await rest.call("GetWebhookSecret", admin, **ids),
        await rest.call("RotateWebhookSecret", admin, body={}, **ids),
        await rest.call("ListWebhooks", admin, project_id=project),
        await rest.call("DeleteWebhook", admin, **ids),
        await rest.call("GetWebhook", admin, **ids),  # 404 now
        await rest.call("ListWebhooks", None, project_id=project),  # 401
    ]
    assert [a.status for a in answers] == [201, 200, 200, 200, 204, 404, 401]
    for answer in answers:
        assert answer.headers.get("Cache-Control") == "no-store", answer
    async with rest.http.get(f"{rest.url}/healthz") as reply:
        assert reply.headers.get("Cache-Control") == "no-store"
    async with rest.http.get(f"{rest.url}/api/openapi.json") as reply:
        assert "no-store" not in reply.headers.get("Cache-Control", "")
