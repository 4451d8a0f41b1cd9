"""The OpenAPI 3.1 document of the REST gateway, generated from the route table.

Paths, parameters and bodies come from :data:`~dembrane.webhooks.gateway.routes.ROUTES`,
schemas from the same REST field views the JSON mapping uses, so whatever the gateway
answers is what the document says it answers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from google.protobuf.descriptor import Descriptor

from dembrane.webhooks import __version__
from dembrane.webhooks.domain.webhooks import MAX_GRACE_SECONDS
from dembrane.webhooks.gateway.comments import api_comments
from dembrane.webhooks.gateway.json_mapping import (
    FieldKind,
    RestField,
    enum_values,
    rest_fields,
    settable_enum_values,
)
from dembrane.webhooks.gateway.routes import Route

__all__ = ["PAGE_TOKEN_HEADER", "build_openapi"]

#: The response header that carries a list's next-page token.
# A header name, not a credential.
PAGE_TOKEN_HEADER = "X-Next-Page-Token"  # noqa: S105

_ERROR_STATUSES: dict[int, str] = {
    400: "A field has a value the service does not accept.",
    413: "The request body is larger than 1 MiB.",
    415: "The request body's Content-Encoding is not gzip, deflate or identity.",
    401: "The bearer token is missing, invalid or expired.",
    403: "The workspace's tier or the caller's role does not allow this.",
    404: "The project or the webhook does not exist, or the caller may not see it.",
    409: "The request conflicts with the webhook's current state.",
    422: "The body is not JSON of the expected types.",
    429: "Too many requests.",
    502: "The webhook service failed to handle the request.",
    503: "The webhook service is unavailable.",
    504: "The webhook service did not answer in time.",
}

_QUERY_KINDS = {FieldKind.STRING, FieldKind.INTEGER, FieldKind.BOOLEAN, FieldKind.ENUM}


def build_openapi(routes: Sequence[Route], *, title: str = "Dembrane webhooks") -> dict[str, Any]:
    """The OpenAPI 3.1 document for ``routes`` plus the health and document routes."""
    builder = _DocumentBuilder(routes)
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.http_method.lower()] = builder.operation(route)
    paths["/healthz"] = {"get": _health_operation()}
    paths["/metrics"] = {"get": _metrics_operation()}
    paths["/api/openapi.json"] = {"get": _document_operation()}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": __version__,
            "description": (
                "Manage a project's webhooks and inspect their deliveries. Every call but "
                "`/healthz`, `/metrics` and this document needs `Authorization: Bearer <JWT>`; "
                "only owners and admins of a workspace on the changemaker tier or above may "
                "manage webhooks. "
                "Lists are bare JSON arrays; when more items exist, the `X-Next-Page-Token` "
                "header holds the `page_token` of the next page. The list of a project's "
                "webhooks is answered whole unless `page_size` or `page_token` asks for a page."
            ),
        },
        # Relative: the routes are served wherever this document is.
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "schemas": builder.schemas,
            "responses": {
                f"Error{status}": _error_response(description)
                for status, description in sorted(_ERROR_STATUSES.items())
            },
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
        },
        "security": [{"bearerAuth": []}],
    }


class _DocumentBuilder:
    """Collects component schemas while operations are described."""

    def __init__(self, routes: Sequence[Route]) -> None:
        self._routes = routes
        self.schemas: dict[str, Any] = {"Error": _error_schema(), "Health": _health_schema()}

    def operation(self, route: Route) -> dict[str, Any]:
        operation: dict[str, Any] = {
            "operationId": route.rpc_name,
            "summary": _summary(route.rpc_name),
            **_described(route.method.full_name),
            "parameters": self._path_parameters(route) + self._query_parameters(route),
            "responses": self._responses(route),
        }
        if route.body == "*":
            operation["requestBody"] = self._request_body(route)
        return operation

    # -- parameters and bodies ----------------------------------------------------------

    def _path_parameters(self, route: Route) -> list[dict[str, Any]]:
        parameters = []
        for name in route.path_parameters:
            # Values that reach another route: dot segments are resolved away by URL
            # normalization, and /webhooks/copyable is not a webhook id.
            excluded = {".", ".."} | _shadowing_literals(route, name, self._routes)
            schema: dict[str, Any] = {
                "type": "string",
                "minLength": 1,
                "not": {"enum": sorted(excluded)},
            }
            parameters.append(
                {
                    "name": name,
                    "in": "path",
                    "required": True,
                    "schema": schema,
                    **_described(route.input_type.fields_by_name[name].full_name),
                }
            )
        return parameters

    def _query_parameters(self, route: Route) -> list[dict[str, Any]]:
        parameters = []
        for field in rest_fields(route.input_type):
            if field.name not in route.query_field_names() or field.kind not in _QUERY_KINDS:
                continue
            parameters.append(
                {
                    "name": field.name,
                    "in": "query",
                    "required": False,
                    "schema": self._field_schema(field, request=True),
                    **_described(field.descriptor.full_name),
                }
            )
        return parameters

    def _request_body(self, route: Route) -> dict[str, Any]:
        names = set(route.body_field_names())
        required = set(route.required_body_keys)
        properties = {
            # The gateway reads null as "not given" (as protobuf's JSON mapping does), so any
            # key but a required one may be null.
            field.name: self._field_schema(field, request=True, nullable=field.name not in required)
            for field in rest_fields(route.input_type)
            if field.name in names
        }
        schema: dict[str, Any] = {"type": "object", "properties": properties}
        if route.required_body_keys:
            schema["required"] = list(route.required_body_keys)
        # A partial update's keys are the fields it changes: it must name one.
        changes = "update_mask" in route.input_type.fields_by_name
        if changes:
            schema["minProperties"] = 1
        name = f"{route.rpc_name}Body"
        self.schemas[name] = schema
        return {
            # A body without required keys may be left out entirely.
            "required": bool(route.required_body_keys) or changes,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}},
        }

    # -- responses -------------------------------------------------------------------

    def _responses(self, route: Route) -> dict[str, Any]:
        responses: dict[str, Any] = {}
        success: dict[str, Any] = {"description": _success_description(route)}
        schema = self._success_schema(route)
        if schema is not None:
            success["content"] = {"application/json": {"schema": schema}}
        if route.pages:
            success["headers"] = {
                PAGE_TOKEN_HEADER: {
                    "description": "The page_token of the next page; absent on the last page.",
                    "schema": {"type": "string"},
                }
            }
        responses[str(route.success_status)] = success
        # Only routes that read a body can meet one that is too large or encoded otherwise.
        statuses = set(_ERROR_STATUSES) - {413, 415}
        if route.body == "*":
            statuses |= {413, 415}
        for status in sorted(statuses):
            responses[str(status)] = {"$ref": f"#/components/responses/Error{status}"}
        return responses

    def _success_schema(self, route: Route) -> dict[str, Any] | None:
        if route.success_status == 204:
            return None
        if route.response_body:
            field = next(
                f for f in rest_fields(route.output_type) if f.proto_name == route.response_body
            )
            return self._field_schema(field, request=False, nullable=False)
        if route.flatten:
            return self._flattened_schema(route)
        return self._message_ref(route.output_type)

    def _flattened_schema(self, route: Route) -> dict[str, Any]:
        name = route.output_type.name
        if name not in self.schemas:
            inner = next(f for f in rest_fields(route.output_type) if f.proto_name == route.flatten)
            # The answer's own description (the webhook and, once, its secret), not the
            # inner message's, which says the secret is never among its fields.
            schema = {
                **self._object_schema(inner.message_type),
                **_described(route.output_type.full_name),
            }
            for field in rest_fields(route.output_type):
                if field.proto_name != route.flatten:
                    # The extras appear only when set (the generated secret, once).
                    schema["properties"][field.name] = self._field_schema(
                        field, request=False, nullable=False
                    )
            self.schemas[name] = schema
        return {"$ref": f"#/components/schemas/{name}"}

    # -- schemas -----------------------------------------------------------------------

    def _message_ref(self, descriptor: Descriptor) -> dict[str, Any]:
        name = descriptor.name
        if name not in self.schemas:
            self.schemas[name] = {}  # a placeholder first, for recursive messages
            self.schemas[name] = self._object_schema(descriptor)
        return {"$ref": f"#/components/schemas/{name}"}

    def _object_schema(self, descriptor: Descriptor) -> dict[str, Any]:
        properties: dict[str, Any] = {}
        for field in rest_fields(descriptor):
            if field.kind is not FieldKind.FIELD_MASK:
                properties[field.name] = self._field_schema(field, request=False)
        return {
            **_described(descriptor.full_name),
            "type": "object",
            "properties": properties,
            "required": list(properties),
            # No additionalProperties: false. The contract lets later versions add keys, and a
            # client validating answers against this document must not break on them.
        }

    def _field_schema(
        self, field: RestField, *, request: bool, nullable: bool | None = None
    ) -> dict[str, Any]:
        schema = self._value_schema(field, request=request)
        if field.repeated:
            # A request's list may be null too, read as "not given" like any other key.
            array_type: Any = ["array", "null"] if request and nullable else "array"
            schema = {"type": array_type, "items": schema}
        elif field.nullable if nullable is None else nullable:
            if "enum" in schema:
                schema = {
                    **schema,
                    "type": [schema["type"], "null"],
                    "enum": [*schema["enum"], None],
                }
            elif "type" in schema:
                schema = {**schema, "type": [schema["type"], "null"]}
            else:
                schema = {"anyOf": [schema, {"type": "null"}]}
        comment = api_comments().get(field.descriptor.full_name)
        if comment:
            # The unit a kind of value adds ("Milliseconds.") follows the field's comment.
            unit = schema.get("description")
            schema = {**schema, "description": f"{comment} {unit}" if unit else comment}
        return schema

    def _value_schema(self, field: RestField, *, request: bool) -> dict[str, Any]:
        match field.kind:
            case FieldKind.STRING:
                return {"type": "string"}
            case FieldKind.INTEGER:
                schema: dict[str, Any] = {"type": "integer", "format": "int32"}
                if request:
                    schema["minimum"] = 0  # request integers are sizes and counts
                return schema
            case FieldKind.BOOLEAN:
                return {"type": "boolean"}
            case FieldKind.NUMBER:
                return {"type": "number"}
            case FieldKind.ENUM:
                values = (settable_enum_values if request else enum_values)(field.enum_type)
                return {"type": "string", "enum": list(values)}
            case FieldKind.TIMESTAMP:
                return {"type": "string", "format": "date-time"}
            case FieldKind.DURATION_MS:
                return {"type": "integer", "description": "Milliseconds."}
            case FieldKind.DURATION_SECONDS:
                schema = {"type": "number", "description": "Seconds."}
                if request:
                    schema["minimum"] = 0
                    longest = _LONGEST_DURATIONS.get(field.descriptor.full_name)
                    if longest is not None:
                        schema["maximum"] = longest
                return schema
            case FieldKind.OBJECT:
                return {"type": "object"}
            case FieldKind.MESSAGE:
                return self._message_ref(field.message_type)
            case _:
                raise TypeError(f"No schema for {field.descriptor.full_name}.")


#: Request durations the service bounds above, in seconds, by the field's full proto name.
_LONGEST_DURATIONS = {
    "dembrane.webhooks.v1.RotateWebhookSecretRequest.grace_period": MAX_GRACE_SECONDS,
}


def _shadowing_literals(route: Route, parameter: str, routes: Sequence[Route]) -> set[str]:
    """Literal segments of other routes that a value of ``parameter`` would collide with."""
    segments = route.path.strip("/").split("/")
    index = segments.index(f"{{{parameter}}}")
    shapes = {_shape(other.path.strip("/").split("/")) for other in routes}
    found = set()
    for other in routes:
        other_segments = other.path.strip("/").split("/")
        if len(other_segments) != len(segments) or other_segments[index].startswith("{"):
            continue
        candidate = [*segments[:index], other_segments[index], *segments[index + 1 :]]
        if _shape(candidate) in shapes:
            found.add(other_segments[index])
    return found


def _shape(segments: Sequence[str]) -> tuple[str, ...]:
    return tuple("{}" if s.startswith("{") else s for s in segments)


def _described(full_name: str) -> dict[str, str]:
    """``{"description": ...}`` with the proto element's comment, or nothing without one."""
    comment = api_comments().get(full_name)
    return {"description": comment} if comment else {}


def _summary(rpc_name: str) -> str:
    words = re.findall(r"[A-Z][a-z]*", rpc_name)
    return " ".join([words[0], *(word.lower() for word in words[1:])])


def _success_description(route: Route) -> str:
    match route.success_status:
        case 201:
            return "Created."
        case 202:
            return "Accepted; the work continues in the background."
        case 204:
            return "Done; no content."
    return "OK."


def _error_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "detail": {"type": "string", "description": "What went wrong, in one sentence."},
            "reason": {
                "type": "string",
                "description": "The machine-readable reason, for example TIER_REQUIRED.",
            },
            "field_violations": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"field": {"type": "string"}, "description": {"type": "string"}},
                    "required": ["field", "description"],
                },
            },
        },
        "required": ["detail"],
    }


def _health_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "status": {"type": "string", "enum": ["ok", "unavailable"]},
            "detail": {"type": "string"},
        },
        "required": ["status"],
    }


def _error_response(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _health_operation() -> dict[str, Any]:
    health = {"application/json": {"schema": {"$ref": "#/components/schemas/Health"}}}
    return {
        "operationId": "Healthz",
        "summary": "Whether the gateway can reach a serving webhook service",
        "security": [],
        "responses": {
            "200": {"description": "The webhook service is serving.", "content": health},
            "503": {"description": "The webhook service is not serving.", "content": health},
        },
    }


def _metrics_operation() -> dict[str, Any]:
    return _open_operation(
        "Metrics",
        "Prometheus metrics of the serving process",
        "Published events, delivery attempts and outcomes, requests in flight, and the "
        "process's own figures, in the Prometheus text format.",
        "text/plain",
        {"type": "string"},
    )


def _document_operation() -> dict[str, Any]:
    return _open_operation(
        "OpenApiDocument",
        "This OpenAPI document",
        "The OpenAPI 3.1 document of the REST gateway.",
        "application/json",
        {"type": "object"},
    )


def _open_operation(
    operation_id: str, summary: str, description: str, media_type: str, schema: dict[str, Any]
) -> dict[str, Any]:
    """An operation without authentication and with a single 200 answer."""
    return {
        "operationId": operation_id,
        "summary": summary,
        "security": [],
        "responses": {
            "200": {"description": description, "content": {media_type: {"schema": schema}}}
        },
    }
