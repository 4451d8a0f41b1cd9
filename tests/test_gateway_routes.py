"""The gateway's route table, JSON mapping and OpenAPI document, without any server."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import jsonschema_rs
import pytest
from google.api import annotations_pb2  # type: ignore[import-untyped]
from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.message import Message

from dembrane.webhooks.gateway.errors import RestError
from dembrane.webhooks.gateway.json_mapping import (
    format_timestamp,
    message_to_json,
    parse_body,
    rest_field_path,
    set_from_json,
    set_from_query,
)
from dembrane.webhooks.gateway.openapi import build_openapi
from dembrane.webhooks.gateway.routes import ROUTES, SERVICE, build_routes
from dembrane.webhooks.v1 import webhook_pb2 as wpb
from dembrane.webhooks.v1 import webhook_service_pb2 as spb

# The routes of the contract's section 5, plus the delivery log, secrets and the catalog.
EXPECTED_ROUTES = {
    ("GET", "/api/projects/{project_id}/webhooks"): "ListWebhooks",
    ("POST", "/api/projects/{project_id}/webhooks"): "CreateWebhook",
    ("GET", "/api/projects/{project_id}/webhooks/{webhook_id}"): "GetWebhook",
    ("PATCH", "/api/projects/{project_id}/webhooks/{webhook_id}"): "UpdateWebhook",
    ("DELETE", "/api/projects/{project_id}/webhooks/{webhook_id}"): "DeleteWebhook",
    ("POST", "/api/projects/{project_id}/webhooks/{webhook_id}/test"): "TestWebhook",
    ("GET", "/api/projects/{project_id}/webhooks/copyable"): "ListCopyableWebhooks",
    ("GET", "/api/projects/{project_id}/webhooks/{webhook_id}/copyable"): "ExportWebhook",
    ("GET", "/api/projects/{project_id}/webhooks/{webhook_id}/secret"): "GetWebhookSecret",
    (
        "POST",
        "/api/projects/{project_id}/webhooks/{webhook_id}/secret/rotate",
    ): "RotateWebhookSecret",
    ("GET", "/api/projects/{project_id}/webhooks/{webhook_id}/deliveries"): "ListDeliveries",
    (
        "GET",
        "/api/projects/{project_id}/webhooks/{webhook_id}/deliveries/{delivery_id}",
    ): "GetDelivery",
    (
        "POST",
        "/api/projects/{project_id}/webhooks/{webhook_id}/deliveries/{delivery_id}/retry",
    ): "RetryDelivery",
    ("POST", "/api/projects/{project_id}/webhooks/{webhook_id}/recover"): "RecoverWebhook",
    ("GET", "/api/projects/{project_id}/webhooks/event-types"): "ListEventTypes",
}


# Every RPC of WebhookService is reachable over REST, because every one is annotated.
def test_every_rpc_has_an_http_annotation() -> None:
    for method in SERVICE.methods:
        assert method.GetOptions().HasExtension(annotations_pb2.http), method.name
    assert {route.rpc_name for route in ROUTES} == {m.name for m in SERVICE.methods}


# The route table is exactly the contract's routes, each onto the right RPC.
def test_route_table_matches_the_contract() -> None:
    table = {(route.http_method, route.path): route.rpc_name for route in ROUTES}
    assert table == EXPECTED_ROUTES


# The table is read from the annotations, so it equals what the descriptor says right now.
def test_route_table_follows_the_annotations() -> None:
    for route in ROUTES:
        rule = route.method.GetOptions().Extensions[annotations_pb2.http]
        pattern = rule.WhichOneof("pattern")
        assert route.http_method == pattern.upper()
        assert route.path == getattr(rule, pattern)
        assert route.body == rule.body
        if rule.response_body:
            assert route.response_body == rule.response_body
    assert build_routes(SERVICE) == ROUTES


# Literal segments are tried before variables, so /webhooks/copyable is not a webhook id.
def test_literal_routes_come_before_variable_ones() -> None:
    order = [route.path for route in ROUTES]
    variable = order.index("/api/projects/{project_id}/webhooks/{webhook_id}")
    assert order.index("/api/projects/{project_id}/webhooks/copyable") < variable
    assert order.index("/api/projects/{project_id}/webhooks/event-types") < variable


# Success statuses follow the contract: 201 on create, 204 on delete, 202 for a recovery.
def test_success_statuses() -> None:
    statuses = {route.rpc_name: route.success_status for route in ROUTES}
    assert statuses.pop("CreateWebhook") == 201
    assert statuses.pop("DeleteWebhook") == 204
    assert statuses.pop("RecoverWebhook") == 202
    assert set(statuses.values()) == {200}


# Every list answers a bare array, and the paged ones put the next token in a header.
def test_lists_are_bare_arrays() -> None:
    lists = {r.rpc_name: r for r in ROUTES if r.rpc_name.startswith("List")}
    assert {name: r.response_body for name, r in lists.items()} == {
        "ListWebhooks": "webhooks",
        "ListCopyableWebhooks": "webhooks",
        "ListDeliveries": "deliveries",
        "ListEventTypes": "event_types",
    }
    assert {name for name, r in lists.items() if r.pages} == {
        "ListWebhooks",
        "ListCopyableWebhooks",
        "ListDeliveries",
    }


# The OpenAPI document describes every route and method, plus health and itself.
def test_openapi_describes_every_route() -> None:
    document = build_openapi(ROUTES)
    assert document["openapi"].startswith("3.1")
    described = {
        (method.upper(), path) for path, item in document["paths"].items() for method in item
    }
    assert described == set(EXPECTED_ROUTES) | {
        ("GET", "/healthz"),
        ("GET", "/metrics"),
        ("GET", "/api/openapi.json"),
    }
    assert document["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    for (method, path), rpc in EXPECTED_ROUTES.items():
        operation = document["paths"][path][method.lower()]
        assert operation["operationId"] == rpc
        for status in ("400", "401", "403", "404", "422"):
            assert status in operation["responses"], (rpc, status)
        # Every $ref points at something that exists.
        text = json.dumps(operation)
        for name in document["components"]["schemas"]:
            text = text.replace(f'"#/components/schemas/{name}"', "")
        for name in document["components"]["responses"]:
            text = text.replace(f'"#/components/responses/{name}"', "")
        assert "#/components/" not in text


# A request body offers only the statuses a person may set; answers show all four.
def test_openapi_describes_operations_schemas_and_fields_with_the_protos_comments() -> None:
    """The document carries the protos' comments: each operation's RPC comment, each
    schema's message comment, and each property's and parameter's field comment (a unit,
    such as milliseconds, after it)."""
    document = build_openapi(ROUTES)
    rpcs = {route.rpc_name for route in ROUTES}
    operations = [op for path in document["paths"].values() for op in path.values()]
    api = [op for op in operations if op["operationId"] in rpcs]
    assert len(api) == len(ROUTES)
    assert all(op.get("description") for op in api)
    deliveries = document["paths"]["/api/projects/{project_id}/webhooks/{webhook_id}/deliveries"]
    listing = deliveries["get"]
    assert listing["description"] == "ListDeliveries returns a webhook's deliveries, newest first."
    parameters = {p["name"]: p for p in listing["parameters"]}
    assert parameters["page_size"]["description"].startswith("How many deliveries to return")
    assert parameters["project_id"]["description"].startswith("The project")
    schemas = document["components"]["schemas"]
    assert schemas["Delivery"]["description"].startswith("Delivery is one event sent")
    attempts = schemas["Delivery"]["properties"]["attempts"]["description"]
    assert "latest five" in attempts
    latency = schemas["DeliveryAttempt"]["properties"]["latency_ms"]["description"]
    assert latency.startswith("How long the request took")
    assert latency.endswith("Milliseconds.")


def test_openapi_answer_schemas_allow_the_keys_later_versions_add() -> None:
    """The contract lets answers gain keys, so no answer schema forbids extra ones, and the
    create answer's description owns up to the secret it carries."""
    document = build_openapi(ROUTES)
    schemas = document["components"]["schemas"]
    for name in ("Webhook", "Delivery", "DeliveryAttempt", "CreateWebhookResponse"):
        assert "additionalProperties" not in schemas[name], name
    assert "secret" in schemas["CreateWebhookResponse"]["properties"]
    assert "once only, its secret" in schemas["CreateWebhookResponse"]["description"]
    assert document["servers"] == [{"url": "/"}]


def test_openapi_lets_an_update_send_null_for_a_list_it_leaves_alone() -> None:
    """The gateway reads a null key as one not given, lists included; the update's schema
    says so for its event list as for its other keys."""
    schemas = build_openapi(ROUTES)["components"]["schemas"]
    assert schemas["UpdateWebhookBody"]["properties"]["events"]["type"] == ["array", "null"]
    assert schemas["UpdateWebhookBody"]["properties"]["name"]["type"] == ["string", "null"]
    assert schemas["Webhook"]["properties"]["events"]["type"] == "array"


def test_openapi_speaks_of_rest_where_the_protos_speak_of_grpc_fields() -> None:
    """Over REST a partial update names its fields by the body's keys, and pages continue
    from the X-Next-Page-Token header; the descriptions say so."""
    document = build_openapi(ROUTES)
    update = document["paths"]["/api/projects/{project_id}/webhooks/{webhook_id}"]["patch"]
    assert "body's keys over REST" in update["description"]
    listing = document["paths"]["/api/projects/{project_id}/webhooks"]["get"]
    token = next(p for p in listing["parameters"] if p["name"] == "page_token")
    assert "X-Next-Page-Token" in token["description"]


def test_openapi_bounds_the_grace_period_as_the_server_does() -> None:
    """A rotation's grace period is 0 to 7 days; the schema says so, so that clients and
    validators refuse a longer one before the server does."""
    schemas = build_openapi(ROUTES)["components"]["schemas"]
    grace = schemas["RotateWebhookSecretBody"]["properties"]["grace_period_seconds"]
    assert (grace["minimum"], grace["maximum"]) == (0, 7 * 24 * 3600)


def test_openapi_offers_only_settable_statuses_in_requests() -> None:
    schemas = build_openapi(ROUTES)["components"]["schemas"]
    settable = ["published", "draft", "archived"]
    # null, like a missing key, leaves the status as it is (or the default on create).
    assert schemas["CreateWebhookBody"]["properties"]["status"]["enum"] == [*settable, None]
    assert schemas["UpdateWebhookBody"]["properties"]["status"]["enum"] == [*settable, None]
    assert schemas["Webhook"]["properties"]["status"]["enum"] == [*settable, "disabled"]


# A partial update must send a body naming at least one field; other bodies stay optional.
def test_openapi_requires_a_partial_update_to_name_a_field() -> None:
    document = build_openapi(ROUTES)
    update = document["paths"]["/api/projects/{project_id}/webhooks/{webhook_id}"]["patch"]
    assert update["requestBody"]["required"] is True
    assert document["components"]["schemas"]["UpdateWebhookBody"]["minProperties"] == 1
    test = document["paths"]["/api/projects/{project_id}/webhooks/{webhook_id}/test"]["post"]
    assert test["requestBody"]["required"] is False
    assert "minProperties" not in document["components"]["schemas"]["TestWebhookBody"]


def test_openapi_documents_body_errors_where_a_body_is_read() -> None:
    """Routes that read a body document 413 (too large) and 415 (unsupported encoding); the
    others document neither."""
    document = build_openapi(ROUTES)
    for route in ROUTES:
        responses = document["paths"][route.path][route.http_method.lower()]["responses"]
        reads_body = route.body == "*"
        assert ("413" in responses, "415" in responses) == (reads_body, reads_body), route.rpc_name


# The document is valid JSON Schema wherever it holds a schema, and the Webhook schema
# accepts what the mapping renders.
def test_openapi_schemas_accept_rendered_messages() -> None:
    document = build_openapi(ROUTES)
    webhook = _sample_webhook()
    _validate(document, "Webhook", message_to_json(webhook))
    created = {**message_to_json(webhook), "secret": "whsec_abc"}
    _validate(document, "CreateWebhookResponse", created)
    delivery = _sample_delivery()
    _validate(document, "Delivery", message_to_json(delivery))
    with pytest.raises(jsonschema_rs.ValidationError):
        _validate(document, "Webhook", {**message_to_json(webhook), "status": "bogus"})


# Webhooks render with the contract's keys: date_created/date_updated and a lowercase status.
def test_webhook_json_shape() -> None:
    body = message_to_json(_sample_webhook())
    assert body == {
        "id": "wh_1",
        "project_id": "p1",
        "name": "Hook",
        "url": "https://example.com/hook",
        "events": ["conversation.started"],
        "status": "published",
        "date_created": "2026-11-28T12:00:00.123456Z",
        "date_updated": "2026-11-28T12:00:00.123456Z",
        "disabled_reason": "",
    }
    assert "secret" not in body


# Unset optional fields are null; durations are whole milliseconds.
def test_delivery_json_nulls_and_latency() -> None:
    body = message_to_json(_sample_delivery())
    assert body["status"] == "failed"
    assert body["next_attempt_at"] is None
    assert body["last_status_code"] == 500
    attempt = body["attempts"][0]
    assert attempt["latency_ms"] == 1500
    assert attempt["attempted_at"] == "2026-11-28T12:00:00.123456Z"
    test_result = message_to_json(spb.TestWebhookResponse(success=False, message="no"))
    assert test_result == {
        "success": False,
        "status_code": None,
        "message": "no",
        "latency_ms": None,
    }


# Timestamps are UTC with a Z, whatever zone the datetime carries.
def test_format_timestamp() -> None:
    moment = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert format_timestamp(moment) == "2026-01-02T03:04:05.000000Z"


# Bodies that are not JSON objects are refused with 422, an empty body is an empty object.
@pytest.mark.parametrize("raw", [b"{", b"[1]", b'"text"', b"\xff\xfe", b"[" * 100_000])
def test_parse_body_refuses_non_objects(raw: bytes) -> None:
    with pytest.raises(RestError) as caught:
        parse_body(raw)
    assert caught.value.status == 422


def test_parse_body_accepts_empty() -> None:
    assert parse_body(b"") == {}
    assert parse_body(b' {"a": 1} ') == {"a": 1}


# Wrong JSON types are 422 with a sentence naming the key; an unknown status name is 400.
@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        ({"name": 5}, 422, "The name field must be a string."),
        ({"events": "conversation.started"}, 422, "The events field must be a list."),
        ({"events": [1]}, 422, "Every item of the events field must be a string."),
        ({"url": ["x"]}, 422, "The url field must be a string."),
        ({"status": True}, 422, "The status field must be a string."),
        ({"name": "\ud800"}, 422, "The name field must be valid Unicode text."),
        (
            {"status": "paused"},
            400,
            "The status field must be one of published, draft, archived.",
        ),
    ],
)
def test_body_type_errors(body: dict[str, object], status: int, detail: str) -> None:
    with pytest.raises(RestError) as caught:
        set_from_json(spb.CreateWebhookRequest(), body, skip=frozenset())
    assert (caught.value.status, caught.value.detail) == (status, detail)


# Keys set in a body are reported (for the update mask); null and unknown keys are ignored.
def test_body_fills_the_request() -> None:
    request = spb.UpdateWebhookRequest()
    given = set_from_json(
        request,
        {"name": "n", "events": ["a"], "status": "draft", "secret": None, "bogus": 1},
        skip=frozenset({"project_id", "webhook_id"}),
    )
    assert given == ["name", "events", "status"]
    assert request.status == wpb.WEBHOOK_STATUS_DRAFT
    assert list(request.events) == ["a"]


# Durations and timestamps in bodies take seconds and ISO 8601.
def test_body_durations_and_timestamps() -> None:
    rotate = spb.RotateWebhookSecretRequest()
    set_from_json(rotate, {"grace_period_seconds": 90.5}, skip=frozenset())
    assert rotate.grace_period.ToNanoseconds() == 90_500_000_000
    recover = spb.RecoverWebhookRequest()
    set_from_json(recover, {"start_time": "2026-11-28T12:00:00+01:00"}, skip=frozenset())
    assert recover.start_time.ToDatetime(tzinfo=UTC) == datetime(2026, 11, 28, 11, tzinfo=UTC)
    assert not recover.HasField("end_time")
    bad_bodies: list[tuple[Message, dict[str, Any]]] = [
        (spb.RecoverWebhookRequest(), {"start_time": "yesterday"}),
        (spb.RecoverWebhookRequest(), {"start_time": 5}),
        (spb.RotateWebhookSecretRequest(), {"grace_period_seconds": "1"}),
        (spb.RotateWebhookSecretRequest(), {"grace_period_seconds": True}),
    ]
    for message, bad in bad_bodies:
        with pytest.raises(RestError) as caught:
            set_from_json(message, bad, skip=frozenset())
        assert caught.value.status == 422
    with pytest.raises(RestError) as caught:
        set_from_json(rotate, {"grace_period_seconds": 1e300}, skip=frozenset())
    assert caught.value.status == 400


# A field's gRPC name, where the REST API names it otherwise, is refused rather than ignored:
# {"grace_period": 3600} would otherwise rotate with the default 24 h grace.
def test_a_fields_grpc_name_is_refused_where_rest_names_it_otherwise() -> None:
    for value in (3600, "abc"):
        with pytest.raises(RestError) as caught:
            set_from_json(
                spb.RotateWebhookSecretRequest(), {"grace_period": value}, skip=frozenset()
            )
        assert caught.value.status == 422
        assert caught.value.detail == (
            "Unknown field grace_period; did you mean grace_period_seconds?"
        )


def test_field_paths_get_their_rest_names() -> None:
    """Proto field paths become REST keys segment by segment through nested messages, and a
    segment the message lacks ends the renaming."""
    rotate = spb.RotateWebhookSecretRequest.DESCRIPTOR
    assert rest_field_path(rotate, "grace_period") == "grace_period_seconds"
    assert rest_field_path(rotate, "secret") == "secret"
    assert rest_field_path(rotate, "unknown") == "unknown"
    delivery = wpb.Delivery.DESCRIPTOR
    assert rest_field_path(delivery, "attempts.attempt_time") == "attempts.attempted_at"
    assert rest_field_path(delivery, "create_time") == "date_created"
    assert rest_field_path(delivery, "nothing.create_time") == "nothing.create_time"


# Query parameters fill scalars: integers, enum filters and strings.
def test_query_parameters() -> None:
    request = spb.ListDeliveriesRequest()
    set_from_query(
        request,
        {"status": "failed", "page_size": "20", "page_token": "t", "event_type": "x"},
        skip=frozenset({"project_id", "webhook_id"}),
    )
    assert request.status == wpb.DELIVERY_STATUS_FAILED
    assert (request.page_size, request.page_token, request.event_type) == (20, "t", "x")
    with pytest.raises(RestError) as caught:
        set_from_query(spb.ListDeliveriesRequest(), {"page_size": "ten"}, skip=frozenset())
    assert caught.value.status == 422
    with pytest.raises(RestError) as caught:
        set_from_query(spb.ListDeliveriesRequest(), {"status": "done"}, skip=frozenset())
    assert caught.value.status == 400


def _stamp() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(datetime(2026, 11, 28, 12, 0, 0, 123456, tzinfo=UTC))
    return stamp


def _sample_webhook() -> wpb.Webhook:
    return wpb.Webhook(
        id="wh_1",
        project_id="p1",
        name="Hook",
        url="https://example.com/hook",
        events=["conversation.started"],
        status=wpb.WEBHOOK_STATUS_PUBLISHED,
        create_time=_stamp(),
        update_time=_stamp(),
    )


def _sample_delivery() -> wpb.Delivery:
    return wpb.Delivery(
        id="dl_1",
        webhook_id="wh_1",
        event_id="evt_1",
        event_type="conversation.started",
        status=wpb.DELIVERY_STATUS_FAILED,
        attempt_count=1,
        create_time=_stamp(),
        last_attempt_time=_stamp(),
        last_status_code=500,
        last_error="The receiver answered 500.",
        attempts=[
            wpb.DeliveryAttempt(
                number=1,
                attempt_time=_stamp(),
                status_code=500,
                latency=duration_pb2.Duration(seconds=1, nanos=500_000_000),
                response_body="oops",
                error="The receiver answered 500.",
            )
        ],
    )


def _validate(document: dict[str, object], schema_name: str, instance: object) -> None:
    schema = {
        "$ref": f"#/components/schemas/{schema_name}",
        "components": document["components"],
    }
    jsonschema_rs.validator_for(schema, validate_formats=True).validate(instance)
