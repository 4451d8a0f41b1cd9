"""The gateway's translation, through a real HTTP client, gateway and gRPC server.

The gRPC server here runs a scripted WebhookService that records each request and answers
what the test says, including rich error statuses, so every mapping rule (status codes,
error bodies, page-token headers, update masks, CORS, size limits) is pinned without
depending on the real service's rules. ``test_gateway_e2e.py`` runs against the real one.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2, message_factory, timestamp_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from dembrane.webhooks.auth import TokenVerifier, mint_token
from dembrane.webhooks.config import Settings
from dembrane.webhooks.gateway import bound_port, create_app, run_gateway
from dembrane.webhooks.gateway.routes import ROUTES, SERVICE, Route
from dembrane.webhooks.v1 import webhook_pb2 as wpb
from dembrane.webhooks.v1 import webhook_service_pb2 as spb

ORIGIN = "https://dashboard.example.test"
TOKEN = "Bearer header.payload.signature"


@dataclass
class Call:
    """One request the scripted service received."""

    rpc: str
    request: Any
    authorization: str | None


@dataclass
class ScriptedService:
    """A WebhookService that records requests and answers from a script."""

    calls: list[Call] = field(default_factory=list)
    responses: dict[str, Message] = field(default_factory=dict)
    errors: dict[str, tuple[grpc.StatusCode, str, list[Message]]] = field(default_factory=dict)

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        handlers = {}
        for method in SERVICE.methods:
            request_class = message_factory.GetMessageClass(method.input_type)
            response_class = message_factory.GetMessageClass(method.output_type)
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                self._behaviour(method.name, response_class),
                request_deserializer=request_class.FromString,
                response_serializer=lambda message: message.SerializeToString(),
            )
        return grpc.method_handlers_generic_handler(SERVICE.full_name, handlers)

    def _behaviour(
        self, name: str, response_class: type[Message]
    ) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Any]:
        async def behave(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            metadata = dict(context.invocation_metadata() or ())
            self.calls.append(Call(name, request, metadata.get("authorization")))
            if name in self.errors:
                code, message, details = self.errors[name]
                status = status_pb2.Status(code=code.value[0], message=message)
                for detail in details:
                    packed = any_pb2.Any()
                    packed.Pack(detail)
                    status.details.append(packed)
                await context.abort(
                    code,
                    message,
                    trailing_metadata=(("grpc-status-details-bin", status.SerializeToString()),),
                )
            return self.responses.get(name, response_class())

        return behave


@dataclass
class Stack:
    """The scripted gRPC server, the gateway in front of it, and an HTTP client."""

    service: ScriptedService
    health: Any  # grpc_health's asyncio servicer, untyped
    http: aiohttp.ClientSession
    url: str

    def last(self, rpc: str) -> Call:
        calls = [call for call in self.service.calls if call.rpc == rpc]
        assert calls, f"{rpc} was not called"
        return calls[-1]


@contextlib.asynccontextmanager
async def gateway_stack(
    token: str = TOKEN, verifier: TokenVerifier | None = None
) -> AsyncIterator[Stack]:
    """A gateway in front of a scripted server, and a session that sends ``token``."""
    scripted = ScriptedService()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((scripted.handler(),))
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await health_servicer.set(SERVICE.full_name, health_pb2.HealthCheckResponse.SERVING)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    app = create_app(grpc_target=f"127.0.0.1:{port}", cors_origins=[ORIGIN], verifier=verifier)
    runner = await run_gateway(app, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{bound_port(runner)}"
    try:
        async with aiohttp.ClientSession(headers={"Authorization": token}) as http:
            yield Stack(scripted, health_servicer, http, url)
    finally:
        await runner.cleanup()
        await server.stop(None)


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    async with gateway_stack() as made:
        yield made


def _stamp(moment: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


WEBHOOK = wpb.Webhook(
    id="wh_1",
    project_id="p1",
    name="Hook",
    url="https://example.com/hook",
    events=["conversation.started"],
    status=wpb.WEBHOOK_STATUS_DISABLED,
    create_time=_stamp(datetime(2026, 11, 28, 12, tzinfo=UTC)),
    update_time=_stamp(datetime(2026, 11, 29, 12, tzinfo=UTC)),
    disabled_reason="The receiver answered 410 Gone.",
)
WEBHOOK_JSON = {
    "id": "wh_1",
    "project_id": "p1",
    "name": "Hook",
    "url": "https://example.com/hook",
    "events": ["conversation.started"],
    "status": "disabled",
    "date_created": "2026-11-28T12:00:00.000000Z",
    "date_updated": "2026-11-29T12:00:00.000000Z",
    "disabled_reason": "The receiver answered 410 Gone.",
}


def _url(route: Route) -> str:
    values = {"project_id": "p1", "webhook_id": "wh_1", "delivery_id": "dl_1"}
    return route.path.format(**values)


# Every route reaches its RPC with the path's ids and the caller's Authorization header.
@pytest.mark.parametrize("route", ROUTES, ids=lambda r: r.rpc_name)
async def test_every_route_reaches_its_rpc(stack: Stack, route: Route) -> None:
    bodies = {
        "RecoverWebhook": {"start_time": "2026-11-28T12:00:00Z"},
        "UpdateWebhook": {"name": "n"},
    }
    body = bodies.get(route.rpc_name, {})
    kwargs: dict[str, Any] = {"json": body} if route.body == "*" else {}
    async with stack.http.request(route.http_method, stack.url + _url(route), **kwargs) as reply:
        assert reply.status == route.success_status, await reply.text()
    call = stack.last(route.rpc_name)
    assert call.authorization == TOKEN
    assert call.request.project_id == "p1"
    if "webhook_id" in route.path_parameters:
        assert call.request.webhook_id == "wh_1"
    if "delivery_id" in route.path_parameters:
        assert call.request.delivery_id == "dl_1"


# Without an Authorization header the gateway answers the server's 401 itself, calling nothing.
async def test_missing_authorization_is_refused_without_a_call(stack: Stack) -> None:
    async with (
        aiohttp.ClientSession() as anonymous,
        anonymous.get(f"{stack.url}/api/projects/p1/webhooks") as reply,
    ):
        assert reply.status == 401
        assert await reply.json() == {"detail": "Invalid session", "reason": "UNAUTHENTICATED"}
    assert stack.service.calls == []


# Requests wrong in some other way too, each answered 400, 413, 415 or 422 with a token.
FLAWED_REQUESTS = {
    "malformed body": ("POST", "/api/projects/p1/webhooks", {"data": b"{not json"}),
    "bad query value": ("GET", "/api/projects/p1/webhooks?page_size=many", {}),
    "unknown coding": (
        "POST",
        "/api/projects/p1/webhooks",
        {"data": b"{}", "headers": {"Content-Encoding": "br"}},
    ),
    "body over 1 MiB": ("POST", "/api/projects/p1/webhooks", {"data": b"x" * (1024 * 1024 + 1)}),
}


@pytest.mark.parametrize(
    ("method", "path", "extra"), FLAWED_REQUESTS.values(), ids=FLAWED_REQUESTS.keys()
)
async def test_no_credentials_is_401_before_anything_else(
    stack: Stack, method: str, path: str, extra: dict[str, Any]
) -> None:
    """A request without an Authorization header, or with one that is not a bearer token,
    is answered 401 whatever else is wrong with it, and the server is not called."""
    async with aiohttp.ClientSession() as anonymous:
        for unusable in ({}, {"Authorization": "Bearer"}, {"Authorization": "Basic dTpw"}):
            headers = {**extra.get("headers", {}), **unusable}
            sent = {**extra, "headers": headers}
            async with anonymous.request(method, stack.url + path, **sent) as reply:
                assert reply.status == 401, unusable
                assert (await reply.json())["detail"] == "Invalid session"
        # The same request with a token is refused for its other fault.
        async with stack.http.request(method, stack.url + path, **extra) as reply:
            assert reply.status in (400, 413, 415, 422)
    assert stack.service.calls == []


@pytest.mark.parametrize(
    ("method", "path", "extra"), FLAWED_REQUESTS.values(), ids=FLAWED_REQUESTS.keys()
)
async def test_with_the_servers_key_a_bad_token_is_401_before_anything_else(
    method: str, path: str, extra: dict[str, Any]
) -> None:
    """A gateway that holds the server's key answers an expired, forged or malformed token
    401 whatever else is wrong with the request (a front end then asks its user to log in
    again rather than showing a form error); a valid token's request gets its other fault,
    and the server is never called."""
    secret = "the-servers-secret-of-a-proper-length-for-hs256"
    verifier = TokenVerifier(Settings(jwt_secret=secret))
    valid = "Bearer " + mint_token(secret, "u-1")
    async with gateway_stack(valid, verifier) as stack, aiohttp.ClientSession() as other:
        for bad in (
            mint_token(secret, "u-1", ttl_seconds=-3600),
            mint_token("another-secret-of-a-proper-length-for-hs256", "u-1"),
            "not-a-jwt",
        ):
            headers = {**extra.get("headers", {}), "Authorization": f"Bearer {bad}"}
            sent = {**extra, "headers": headers}
            async with other.request(method, stack.url + path, **sent) as reply:
                assert reply.status == 401
                assert (await reply.json())["detail"] == "Invalid session"
        async with stack.http.request(method, stack.url + path, **extra) as reply:
            assert reply.status in (400, 413, 415, 422)
        assert stack.service.calls == []


async def test_a_token_the_server_refuses_after_the_gateway_took_it_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """When the server answers UNAUTHENTICATED for a token the gateway's own check passed
    (their WEBHOOKS_JWT_* settings differ), the caller gets the usual 401 and the log says
    why, once, however many calls follow."""
    secret = "the-gateways-secret-of-a-proper-length-for-hs256"
    token = "Bearer " + mint_token(secret, "u-1")
    verifier = TokenVerifier(Settings(jwt_secret=secret))
    async with gateway_stack(token, verifier) as stack:
        stack.service.errors["ListWebhooks"] = (
            grpc.StatusCode.UNAUTHENTICATED,
            "Invalid session",
            [_info("UNAUTHENTICATED")],
        )
        for _ in range(3):
            async with stack.http.get(f"{stack.url}/api/projects/p1/webhooks") as reply:
                assert reply.status == 401
                assert (await reply.json())["detail"] == "Invalid session"
    warnings = [r.getMessage() for r in caplog.records if "refused a token" in r.getMessage()]
    assert len(warnings) == 1
    assert "WEBHOOKS_JWT_*" in warnings[0]
    assert secret not in caplog.text
    assert token not in caplog.text


def _info(reason: str) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(reason=reason, domain="webhooks.dembrane.com")


# Each status of the contract's error table becomes its HTTP answer with the server's sentence.
@pytest.mark.parametrize(
    ("code", "message", "details", "status", "body"),
    [
        (
            grpc.StatusCode.UNAUTHENTICATED,
            "Invalid session",
            [_info("UNAUTHENTICATED")],
            401,
            {"detail": "Invalid session", "reason": "UNAUTHENTICATED"},
        ),
        (
            grpc.StatusCode.NOT_FOUND,
            "Project not found",
            [_info("PROJECT_NOT_FOUND")],
            404,
            {"detail": "Project not found", "reason": "PROJECT_NOT_FOUND"},
        ),
        (
            grpc.StatusCode.PERMISSION_DENIED,
            "This action requires the changemaker tier (currently innovator).",
            [_info("TIER_REQUIRED")],
            403,
            {
                "detail": "This action requires the changemaker tier (currently innovator).",
                "reason": "TIER_REQUIRED",
            },
        ),
        (
            grpc.StatusCode.PERMISSION_DENIED,
            "Not allowed",
            [_info("ROLE_REQUIRED")],
            403,
            {"detail": "Not allowed", "reason": "ROLE_REQUIRED"},
        ),
        (
            grpc.StatusCode.NOT_FOUND,
            "Webhook not found",
            [],
            404,
            {"detail": "Webhook not found"},
        ),
        (
            grpc.StatusCode.INVALID_ARGUMENT,
            "events holds an unknown event type: nope.",
            [
                _info("INVALID_ARGUMENT"),
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field="events", description="events holds an unknown event type: nope."
                        )
                    ]
                ),
            ],
            400,
            {
                "detail": "events holds an unknown event type: nope.",
                "reason": "INVALID_ARGUMENT",
                "field_violations": [
                    {"field": "events", "description": "events holds an unknown event type: nope."}
                ],
            },
        ),
        (grpc.StatusCode.FAILED_PRECONDITION, "Busy.", [], 409, {"detail": "Busy."}),
        (grpc.StatusCode.ALREADY_EXISTS, "Exists.", [], 409, {"detail": "Exists."}),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "Slow down.", [], 429, {"detail": "Slow down."}),
        (
            grpc.StatusCode.UNAVAILABLE,
            "connect to 10.0.0.7:50051 failed",
            [],
            503,
            {
                "detail": "The webhook service is unavailable; try again shortly.",
                "reason": "UNAVAILABLE",
            },
        ),
        (
            grpc.StatusCode.DEADLINE_EXCEEDED,
            "deadline",
            [],
            504,
            {
                "detail": "The webhook service did not answer in time.",
                "reason": "DEADLINE_EXCEEDED",
            },
        ),
        (
            grpc.StatusCode.INTERNAL,
            'Traceback (most recent call last): File "x.py"',
            [],
            502,
            {"detail": "The webhook service failed to handle the request.", "reason": "INTERNAL"},
        ),
        (
            grpc.StatusCode.UNKNOWN,
            "boom",
            [],
            502,
            {"detail": "The webhook service failed to handle the request.", "reason": "INTERNAL"},
        ),
    ],
)
async def test_status_codes_become_http_errors(
    stack: Stack,
    code: grpc.StatusCode,
    message: str,
    details: list[Message],
    status: int,
    body: dict[str, Any],
) -> None:
    stack.service.errors["GetWebhook"] = (code, message, details)
    async with stack.http.get(f"{stack.url}/api/projects/p1/webhooks/wh_1") as reply:
        assert reply.status == status
        assert reply.content_type == "application/json"
        assert await reply.json() == body


async def test_server_violations_use_the_rest_names(stack: Stack) -> None:
    """The server's field violations reach REST callers under the keys they sent: a proto name
    the REST API renames (grace_period) becomes its REST key, other paths pass unchanged."""
    violations = [
        ("grace_period", "The grace period must be between 0 and 7 days."),
        ("secret", "The secret is too short."),
        ("no_such_field.x", "Odd."),
    ]
    stack.service.errors["RotateWebhookSecret"] = (
        grpc.StatusCode.INVALID_ARGUMENT,
        "The grace period must be between 0 and 7 days.",
        [
            _info("INVALID_ARGUMENT"),
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=name, description=text)
                    for name, text in violations
                ]
            ),
        ],
    )
    async with stack.http.post(
        f"{stack.url}/api/projects/p1/webhooks/wh_1/secret/rotate",
        json={"grace_period_seconds": -5},
    ) as reply:
        assert reply.status == 400
        body = await reply.json()
    assert [(v["field"], v["description"]) for v in body["field_violations"]] == [
        ("grace_period_seconds", "The grace period must be between 0 and 7 days."),
        ("secret", "The secret is too short."),
        ("no_such_field.x", "Odd."),
    ]


# Bodies of the wrong JSON types are refused with 422 and reason INVALID_ARGUMENT before any
# RPC is made.
@pytest.mark.parametrize(
    ("raw", "detail"),
    [
        (b"{not json", "The request body is not valid JSON."),
        (b"[]", "The request body must be a JSON object."),
        (b'{"name": 5, "url": "https://x.test", "events": []}', "The name field must be a string."),
        (b'{"name": "n", "url": "u", "events": "a"}', "The events field must be a list."),
        (
            b'{"name": "n", "url": "u", "events": [1, 2]}',
            "Every item of the events field must be a string.",
        ),
        (
            b'{"name": "\\ud800", "url": "u", "events": []}',
            "The name field must be valid Unicode text.",
        ),
    ],
)
async def test_malformed_bodies_are_422(stack: Stack, raw: bytes, detail: str) -> None:
    async with stack.http.post(
        f"{stack.url}/api/projects/p1/webhooks",
        data=raw,
        headers={"Content-Type": "application/json"},
    ) as reply:
        assert reply.status == 422
        assert await reply.json() == {"detail": detail, "reason": "INVALID_ARGUMENT"}
    assert stack.service.calls == []


# A status name the API does not know is a bad field value: 400, naming the settable choices
# (and, for a name in the wrong case, the one it was meant to be).
async def test_unknown_status_is_400(stack: Stack) -> None:
    async with stack.http.patch(
        f"{stack.url}/api/projects/p1/webhooks/wh_1", json={"status": "paused"}
    ) as reply:
        assert reply.status == 400
        detail = "The status field must be one of published, draft, archived."
        assert await reply.json() == {
            "detail": detail,
            "reason": "INVALID_ARGUMENT",
            "field_violations": [{"field": "status", "description": detail}],
        }
    async with stack.http.patch(
        f"{stack.url}/api/projects/p1/webhooks/wh_1", json={"status": "DRAFT"}
    ) as reply:
        assert reply.status == 400
        assert (await reply.json())["detail"] == (
            "The status field must be one of published, draft, archived (in lower case: draft)."
        )
    async with stack.http.get(
        f"{stack.url}/api/projects/p1/webhooks/wh_1/deliveries", params={"status": "late"}
    ) as reply:
        assert reply.status == 400
    async with stack.http.get(
        f"{stack.url}/api/projects/p1/webhooks", params={"page_size": "lots"}
    ) as reply:
        assert reply.status == 422
        assert await reply.json() == {
            "detail": "The page_size parameter must be an integer.",
            "reason": "INVALID_ARGUMENT",
        }
    assert stack.service.calls == []


_WEBHOOK_STATUSES = "published, draft, archived"
_INT32_HIGH = "at most 2147483647"
_INT32_LOW = "at least -2147483648"


@pytest.mark.parametrize(
    ("method", "path", "request_kwargs", "field_name", "detail"),
    [
        (
            "POST",
            "",
            {"json": {"name": "n", "url": "https://x.test", "events": ["a"], "status": "bogus"}},
            "status",
            f"The status field must be one of {_WEBHOOK_STATUSES}.",
        ),
        (
            "PATCH",
            "/wh_1",
            {"json": {"status": "bogus"}},
            "status",
            f"The status field must be one of {_WEBHOOK_STATUSES}.",
        ),
        (
            "GET",
            "",
            {"params": {"page_size": "99999999999"}},
            "page_size",
            f"The page_size parameter must be {_INT32_HIGH}.",
        ),
        (
            "GET",
            "",
            {"params": {"page_size": "9999999999999"}},
            "page_size",
            f"The page_size parameter must be {_INT32_HIGH}.",
        ),
        (
            "GET",
            "",
            {"params": {"page_size": "-" + "9" * 5000}},
            "page_size",
            f"The page_size parameter must be {_INT32_LOW}.",
        ),
        (
            "GET",
            "/wh_1/deliveries",
            {"params": {"status": "late"}},
            "status",
            "The status parameter must be one of pending, succeeded, failed, skipped.",
        ),
        (
            "GET",
            "/wh_1/deliveries",
            {"params": {"page_size": "-99999999999"}},
            "page_size",
            f"The page_size parameter must be {_INT32_LOW}.",
        ),
        (
            "POST",
            "/wh_1/secret/rotate",
            {"json": {"grace_period_seconds": 1_000_000_000_000}},
            "grace_period_seconds",
            "The grace_period_seconds field is out of range.",
        ),
        (
            "POST",
            "/wh_1/recover",
            {"json": {"start_time": "2026-11-28T12:00:00Z", "end_time": "9999-12-31T23:00-01:00"}},
            "end_time",
            "The end_time field is out of range.",
        ),
    ],
    ids=[
        "create-status",
        "update-status",
        "webhooks-page-size",
        "webhooks-page-size-13-digits",
        "webhooks-page-size-5000-digits",
        "deliveries-status",
        "deliveries-page-size",
        "rotate-grace-period",
        "recover-end-time",
    ],
)
async def test_values_the_gateway_refuses_name_their_field(
    stack: Stack,
    method: str,
    path: str,
    request_kwargs: dict[str, Any],
    field_name: str,
    detail: str,
) -> None:
    """A well-typed value the gateway cannot map (an unknown enum name, an integer or a time
    out of range) is a 400 whose field violation names the REST key the caller sent."""
    url = f"{stack.url}/api/projects/p1/webhooks{path}"
    async with stack.http.request(method, url, **request_kwargs) as reply:
        assert reply.status == 400
        assert await reply.json() == {
            "detail": detail,
            "reason": "INVALID_ARGUMENT",
            "field_violations": [{"field": field_name, "description": detail}],
        }
    assert stack.service.calls == []


async def test_integer_parameters_may_have_leading_zeros(stack: Stack) -> None:
    """An integer query parameter is read by its value, however many leading zeros it has."""
    async with stack.http.get(
        f"{stack.url}/api/projects/p1/webhooks", params={"page_size": "0000000000000000025"}
    ) as reply:
        assert reply.status == 200, await reply.text()
    assert stack.last("ListWebhooks").request.page_size == 25


# The keys present in a PATCH body are exactly the update mask; null means "not given".
async def test_patch_keys_become_the_update_mask(stack: Stack) -> None:
    stack.service.responses["UpdateWebhook"] = spb.UpdateWebhookResponse(webhook=WEBHOOK)
    async with stack.http.patch(
        f"{stack.url}/api/projects/p1/webhooks/wh_1",
        json={"status": "published", "events": ["report.generated"], "name": None, "x": 1},
    ) as reply:
        assert reply.status == 200
        assert await reply.json() == WEBHOOK_JSON
    request = stack.last("UpdateWebhook").request
    assert list(request.update_mask.paths) == ["events", "status"]
    assert request.status == wpb.WEBHOOK_STATUS_PUBLISHED
    assert list(request.events) == ["report.generated"]


# A PATCH body with no field to change is refused by its REST names, never as "update_mask".
@pytest.mark.parametrize("body", [{}, {"name": None, "x": 1}])
async def test_patch_that_changes_nothing_is_refused(stack: Stack, body: dict[str, Any]) -> None:
    async with stack.http.patch(f"{stack.url}/api/projects/p1/webhooks/wh_1", json=body) as reply:
        assert reply.status == 400
        answer = await reply.json()
    assert answer == {
        "detail": "The request body names no field to change; "
        "give one or more of name, url, events, secret, status.",
        "reason": "INVALID_ARGUMENT",
    }
    assert stack.service.calls == []


# Create answers 201 with the webhook, and the secret only when the service generated it.
async def test_create_returns_the_generated_secret_once(stack: Stack) -> None:
    body = {"name": "Hook", "url": "https://example.com/hook", "events": ["a"]}
    stack.service.responses["CreateWebhook"] = spb.CreateWebhookResponse(
        webhook=WEBHOOK, secret="whsec_generated"
    )
    async with stack.http.post(f"{stack.url}/api/projects/p1/webhooks", json=body) as reply:
        assert reply.status == 201
        assert await reply.json() == {**WEBHOOK_JSON, "secret": "whsec_generated"}
    request = stack.last("CreateWebhook").request
    assert (request.name, request.url, list(request.events)) == (body["name"], body["url"], ["a"])
    assert not request.HasField("secret")
    stack.service.responses["CreateWebhook"] = spb.CreateWebhookResponse(webhook=WEBHOOK)
    own = {**body, "secret": "my-own-secret"}
    async with stack.http.post(f"{stack.url}/api/projects/p1/webhooks", json=own) as reply:
        assert reply.status == 201
        assert "secret" not in await reply.json()
    assert stack.last("CreateWebhook").request.secret == "my-own-secret"


# Delete answers 204 with an empty body.
async def test_delete_is_204_without_body(stack: Stack) -> None:
    async with stack.http.delete(f"{stack.url}/api/projects/p1/webhooks/wh_1") as reply:
        assert reply.status == 204
        assert await reply.read() == b""


# Lists are bare arrays; the next page's token travels in X-Next-Page-Token, and the
# page_size/page_token query parameters reach the request.
async def test_list_pages(stack: Stack) -> None:
    stack.service.responses["ListWebhooks"] = spb.ListWebhooksResponse(
        webhooks=[WEBHOOK], next_page_token="next-1"
    )
    async with stack.http.get(
        f"{stack.url}/api/projects/p1/webhooks", params={"page_size": "1", "page_token": "t0"}
    ) as reply:
        assert reply.status == 200
        assert await reply.json() == [WEBHOOK_JSON]
        assert reply.headers["X-Next-Page-Token"] == "next-1"
    request = stack.last("ListWebhooks").request
    assert (request.page_size, request.page_token) == (1, "t0")
    stack.service.responses["ListWebhooks"] = spb.ListWebhooksResponse()
    async with stack.http.get(f"{stack.url}/api/projects/p1/webhooks") as reply:
        assert await reply.json() == []
        assert "X-Next-Page-Token" not in reply.headers


# The test answer reports success, status_code (null on connection failure) and message.
async def test_test_answer_shape(stack: Stack) -> None:
    stack.service.responses["TestWebhook"] = spb.TestWebhookResponse(
        success=False,
        message="Failed to connect to webhook: refused",
        latency=duration_pb2.Duration(nanos=2_400_000),
    )
    async with stack.http.post(f"{stack.url}/api/projects/p1/webhooks/wh_1/test") as reply:
        assert reply.status == 200
        assert await reply.json() == {
            "success": False,
            "status_code": None,
            "message": "Failed to connect to webhook: refused",
            "latency_ms": 2,
        }


# Delivery lists leave attempts out; one delivery carries them; filters reach the request.
async def test_delivery_log(stack: Stack) -> None:
    created = _stamp(datetime(2026, 11, 28, 12, tzinfo=UTC))
    delivery = wpb.Delivery(
        id="dl_1",
        webhook_id="wh_1",
        event_id="evt_1",
        event_type="conversation.started",
        status=wpb.DELIVERY_STATUS_SUCCEEDED,
        attempt_count=1,
        create_time=created,
        last_attempt_time=created,
        last_status_code=200,
        attempts=[
            wpb.DeliveryAttempt(number=1, attempt_time=created, status_code=200, success=True)
        ],
    )
    stack.service.responses["ListDeliveries"] = spb.ListDeliveriesResponse(deliveries=[delivery])
    stack.service.responses["GetDelivery"] = spb.GetDeliveryResponse(delivery=delivery)
    base = f"{stack.url}/api/projects/p1/webhooks/wh_1/deliveries"
    async with stack.http.get(
        base, params={"status": "succeeded", "event_type": "conversation.started"}
    ) as reply:
        [listed] = await reply.json()
    # A listed delivery carries the attempts the server gives it.
    assert [a["status_code"] for a in listed["attempts"]] == [200]
    assert listed["status"] == "succeeded"
    assert listed["next_attempt_at"] is None
    assert listed["date_created"] == "2026-11-28T12:00:00.000000Z"
    request = stack.last("ListDeliveries").request
    assert request.status == wpb.DELIVERY_STATUS_SUCCEEDED
    assert request.event_type == "conversation.started"
    async with stack.http.get(f"{base}/dl_1") as reply:
        one = await reply.json()
    assert one["attempts"] == [
        {
            "number": 1,
            "attempted_at": "2026-11-28T12:00:00.000000Z",
            "status_code": 200,
            "latency_ms": None,
            "response_body": "",
            "error": "",
            "success": True,
        }
    ]


# Secret rotation takes seconds of grace and answers the new secret and the old one's end.
async def test_secret_rotation(stack: Stack) -> None:
    stack.service.responses["RotateWebhookSecret"] = spb.RotateWebhookSecretResponse(
        secret="whsec_new", previous_secret_expire_time=_stamp(datetime(2026, 1, 2, tzinfo=UTC))
    )
    async with stack.http.post(
        f"{stack.url}/api/projects/p1/webhooks/wh_1/secret/rotate",
        json={"grace_period_seconds": 3600},
    ) as reply:
        assert reply.status == 200
        assert await reply.json() == {
            "secret": "whsec_new",
            "previous_secret_expires_at": "2026-01-02T00:00:00.000000Z",
        }
    request = stack.last("RotateWebhookSecret").request
    assert request.grace_period.seconds == 3600
    assert not request.HasField("secret")


# Recovery takes an ISO 8601 window and answers 202 with the job and its size.
async def test_recover(stack: Stack) -> None:
    stack.service.responses["RecoverWebhook"] = spb.RecoverWebhookResponse(
        recovery_id="rec_1", delivery_count=3
    )
    async with stack.http.post(
        f"{stack.url}/api/projects/p1/webhooks/wh_1/recover",
        json={"start_time": "2026-11-28T12:00:00Z", "end_time": "2026-11-28T13:00:00+00:00"},
    ) as reply:
        assert reply.status == 202
        assert await reply.json() == {"recovery_id": "rec_1", "delivery_count": 3}
    request = stack.last("RecoverWebhook").request
    assert request.start_time.ToDatetime(tzinfo=UTC) == datetime(2026, 11, 28, 12, tzinfo=UTC)
    assert request.end_time.ToDatetime(tzinfo=UTC) == datetime(2026, 11, 28, 13, tzinfo=UTC)
    async with stack.http.post(
        f"{stack.url}/api/projects/p1/webhooks/wh_1/recover", json={"start_time": "soon"}
    ) as reply:
        assert reply.status == 422


# Bodies over 1 MiB are refused with 413, whether announced by Content-Length or streamed.
async def test_large_bodies_are_413(stack: Stack) -> None:
    big = b'{"name": "' + b"x" * (1024 * 1024) + b'"}'
    url = f"{stack.url}/api/projects/p1/webhooks"
    async with stack.http.post(url, data=big) as reply:
        assert reply.status == 413
        assert await reply.json() == {
            "detail": "Request body is larger than 1 MiB.",
            "reason": "PAYLOAD_TOO_LARGE",
        }

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(big), 64 * 1024):
            yield big[start : start + 64 * 1024]

    async with stack.http.post(url, data=chunks()) as reply:
        assert reply.status == 413
        assert await reply.json() == {
            "detail": "Request body is larger than 1 MiB.",
            "reason": "PAYLOAD_TOO_LARGE",
        }
    assert stack.service.calls == []


def _raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


def _errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]


async def test_compressed_bodies_are_decoded(stack: Stack) -> None:
    """Bodies in gzip (one member or several), deflate (zlib or raw) or identity reach the RPC
    decoded."""
    body = b'{"name": "Hook", "url": "https://example.com/hook", "events": ["a"]}'
    half = len(body) // 2
    encoded = [
        ("gzip", gzip.compress(body)),
        ("GZIP", gzip.compress(body[:half]) + gzip.compress(body[half:])),
        ("deflate", zlib.compress(body)),
        ("deflate", _raw_deflate(body)),
        ("identity", body),
    ]
    for coding, data in encoded:
        async with stack.http.post(
            f"{stack.url}/api/projects/p1/webhooks",
            data=data,
            headers={"Content-Encoding": coding, "Content-Type": "application/json"},
        ) as reply:
            assert reply.status == 201, (coding, await reply.text())
    requests = [call.request for call in stack.service.calls]
    assert [(r.name, r.url, list(r.events)) for r in requests] == [
        ("Hook", "https://example.com/hook", ["a"])
    ] * len(encoded)


@pytest.mark.parametrize(
    ("coding", "data"),
    [
        ("gzip", b"notgzip"),
        ("gzip", gzip.compress(b'{"name": "Hook"}', mtime=0)[:-6]),
        ("deflate", b"notdeflate"),
    ],
    ids=["not-gzip", "truncated-gzip", "not-deflate"],
)
async def test_undecodable_bodies_are_400(
    stack: Stack, caplog: pytest.LogCaptureFixture, coding: str, data: bytes
) -> None:
    """A body that is not what its Content-Encoding says is a 400 naming the encoding, and
    nothing is logged as an error."""
    caplog.set_level("WARNING")
    async with stack.http.post(
        f"{stack.url}/api/projects/p1/webhooks",
        data=data,
        headers={"Content-Encoding": coding, "Content-Type": "application/json"},
    ) as reply:
        assert reply.status == 400
        assert await reply.json() == {
            "detail": f"The request body could not be decoded as its Content-Encoding ({coding}) "
            "says.",
            "reason": "INVALID_ARGUMENT",
        }
    assert stack.service.calls == []
    assert _errors_logged(caplog) == []


async def test_compressed_bodies_are_limited_when_decoded(stack: Stack) -> None:
    """A compressed body is refused with 413 once it decodes to more than 1 MiB, and taken up
    to exactly 1 MiB."""
    url = f"{stack.url}/api/projects/p1/webhooks"
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    exact = b'{"name": "' + b"x" * (1024 * 1024 - 12) + b'"}'
    assert len(exact) == 1024 * 1024
    async with stack.http.post(url, data=gzip.compress(exact), headers=headers) as reply:
        assert reply.status == 201, await reply.text()
    for decoded in (exact[:-2] + b'x"}', b" " * (64 * 1024 * 1024)):
        async with stack.http.post(url, data=gzip.compress(decoded), headers=headers) as reply:
            assert reply.status == 413
            assert await reply.json() == {
                "detail": "Request body is larger than 1 MiB.",
                "reason": "PAYLOAD_TOO_LARGE",
            }
    assert len(stack.service.calls) == 1


@pytest.mark.parametrize("coding", ["br", "zstd", "compress", "gzip, br"])
async def test_unsupported_encodings_are_415(
    stack: Stack, caplog: pytest.LogCaptureFixture, coding: str
) -> None:
    """A body in an encoding the gateway does not take is a JSON 415 naming the ones it takes,
    and nothing is logged as an error."""
    caplog.set_level("WARNING")
    async with stack.http.post(
        f"{stack.url}/api/projects/p1/webhooks",
        data=b'{"name": "Hook"}',
        headers={"Content-Encoding": coding, "Content-Type": "application/json"},
    ) as reply:
        assert reply.status == 415
        assert reply.headers["Accept-Encoding"] == "gzip, deflate, identity"
        assert await reply.json() == {
            "detail": "The request body's Content-Encoding must be gzip, deflate or identity.",
            "reason": "UNSUPPORTED_MEDIA_TYPE",
        }
    assert stack.service.calls == []
    assert _errors_logged(caplog) == []


# Unknown paths and wrong methods answer JSON too, never an HTML page.
async def test_unknown_routes_and_methods(stack: Stack) -> None:
    async with stack.http.get(f"{stack.url}/api/nothing") as reply:
        assert reply.status == 404
        assert await reply.json() == {"detail": "Not found", "reason": "NOT_FOUND"}
    async with stack.http.put(f"{stack.url}/api/projects/p1/webhooks/wh_1") as reply:
        assert reply.status == 405
        assert await reply.json() == {
            "detail": "Method not allowed",
            "reason": "METHOD_NOT_ALLOWED",
        }
        assert set(reply.headers["Allow"].split(", ")) == {"GET", "HEAD", "PATCH", "DELETE"}


# /webhooks/copyable and /webhooks/event-types are their own routes, not webhook ids.
async def test_literal_segments_win(stack: Stack) -> None:
    stack.service.responses["ListCopyableWebhooks"] = spb.ListCopyableWebhooksResponse(
        webhooks=[
            wpb.CopyableWebhook(
                id="wh_9",
                name="Other",
                url="https://example.com/o",
                events=["report.generated"],
                project_id="p2",
                project_name="Second project",
            )
        ]
    )
    async with stack.http.get(f"{stack.url}/api/projects/p1/webhooks/copyable") as reply:
        assert await reply.json() == [
            {
                "id": "wh_9",
                "name": "Other",
                "url": "https://example.com/o",
                "events": ["report.generated"],
                "project_id": "p2",
                "project_name": "Second project",
            }
        ]
    async with stack.http.get(f"{stack.url}/api/projects/p1/webhooks/event-types") as reply:
        assert await reply.json() == []
    assert [call.rpc for call in stack.service.calls] == ["ListCopyableWebhooks", "ListEventTypes"]


# Configured origins get CORS headers and preflight answers; other origins get none.
async def test_cors(stack: Stack) -> None:
    url = f"{stack.url}/api/projects/p1/webhooks"
    preflight = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "PATCH",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    async with stack.http.options(url, headers=preflight) as reply:
        assert reply.status == 204
        assert reply.headers["Access-Control-Allow-Origin"] == ORIGIN
        assert "PATCH" in reply.headers["Access-Control-Allow-Methods"]
        assert "Authorization" in reply.headers["Access-Control-Allow-Headers"]
        assert reply.headers["Access-Control-Allow-Credentials"] == "true"
    async with stack.http.get(url, headers={"Origin": ORIGIN}) as reply:
        assert reply.headers["Access-Control-Allow-Origin"] == ORIGIN
        assert reply.headers["Access-Control-Expose-Headers"] == "X-Next-Page-Token"
        assert reply.headers["Access-Control-Allow-Credentials"] == "true"
        assert "Origin" in reply.headers["Vary"]
    async with stack.http.get(url, headers={"Origin": "https://evil.example"}) as reply:
        assert "Access-Control-Allow-Origin" not in reply.headers
    async with stack.http.options(
        url, headers={**preflight, "Origin": "https://evil.example"}
    ) as reply:
        assert "Access-Control-Allow-Origin" not in reply.headers


# A listed origin may send credentials (the platform's front end sends them, and a browser
# drops the answer without this consent); origins allowed only through * may not.
async def test_cors_credentials_only_for_listed_origins() -> None:
    app = create_app(grpc_target="127.0.0.1:9", cors_origins=["*"], rpc_timeout=1)
    runner = await run_gateway(app, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{bound_port(runner)}/api/projects/p1/webhooks"
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "GET"}
    try:
        async with aiohttp.ClientSession() as http:
            async with http.options(url, headers=preflight) as reply:
                assert reply.headers["Access-Control-Allow-Origin"] == ORIGIN
                assert "Access-Control-Allow-Credentials" not in reply.headers
            async with http.get(url, headers={"Origin": ORIGIN}) as reply:
                assert reply.headers["Access-Control-Allow-Origin"] == ORIGIN
                assert "Access-Control-Allow-Credentials" not in reply.headers
    finally:
        await runner.cleanup()


# /healthz follows the gRPC health of WebhookService.
async def test_healthz(stack: Stack) -> None:
    async with stack.http.get(f"{stack.url}/healthz") as reply:
        assert reply.status == 200
        assert await reply.json() == {"status": "ok"}
    await stack.health.set(SERVICE.full_name, health_pb2.HealthCheckResponse.NOT_SERVING)
    async with stack.http.get(f"{stack.url}/healthz") as reply:
        assert reply.status == 503
        assert (await reply.json())["status"] == "unavailable"


# With the gRPC server gone, calls answer 503 and /healthz says so, without a traceback.
async def test_unreachable_server() -> None:
    app = create_app(grpc_target="127.0.0.1:9", rpc_timeout=5)
    runner = await run_gateway(app, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{bound_port(runner)}"
    try:
        async with aiohttp.ClientSession(headers={"Authorization": TOKEN}) as http:
            async with http.get(f"{url}/api/projects/p1/webhooks") as reply:
                assert reply.status == 503
                assert await reply.json() == {
                    "detail": "The webhook service is unavailable; try again shortly.",
                    "reason": "UNAVAILABLE",
                }
            async with http.get(f"{url}/healthz") as reply:
                assert reply.status == 503
    finally:
        await runner.cleanup()


# The OpenAPI document is served as JSON.
async def test_openapi_is_served(stack: Stack) -> None:
    async with stack.http.get(f"{stack.url}/api/openapi.json") as reply:
        assert reply.status == 200
        document = await reply.json()
    assert document["openapi"] == "3.1.0"
    assert "/api/projects/{project_id}/webhooks/{webhook_id}/deliveries" in document["paths"]


# While the server is down, the gateway logs its failed calls once a minute, not once each.
async def test_calls_failing_while_the_server_is_down_are_logged_once(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="dembrane.webhooks.gateway.errors")
    stack.service.errors["GetWebhook"] = (grpc.StatusCode.UNAVAILABLE, "down", [])
    for _ in range(20):
        async with stack.http.get(f"{stack.url}/api/projects/p1/webhooks/wh_1") as reply:
            assert reply.status == 503
    lines = [r.getMessage() for r in caplog.records if "failed with UNAVAILABLE" in r.getMessage()]
    assert len(lines) <= 1
