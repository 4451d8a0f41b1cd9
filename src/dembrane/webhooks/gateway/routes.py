"""The route table, read from the ``google.api.http`` options of WebhookService.

Every HTTP route the gateway serves comes from an annotation in ``webhook_service.proto``,
so adding or moving an RPC's route is a proto change and the gateway follows it; an
annotation the gateway cannot serve (a custom verb, a ``{name=pattern}`` variable, a body
that names one field) stops the import instead of being skipped quietly.

What the annotations cannot say lives in a few small tables below, each keyed by RPC name
and checked against the service at import: the success status where it is not 200, and how
a response that the annotation leaves whole is shaped into the contract's JSON.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

# googleapis-common-protos ships no type information for google.api.
from google.api import annotations_pb2, http_pb2  # type: ignore[import-untyped]
from google.protobuf.descriptor import Descriptor, MethodDescriptor, ServiceDescriptor

from dembrane.webhooks.gateway.json_mapping import FieldKind, rest_fields
from dembrane.webhooks.v1 import webhook_service_pb2

__all__ = [
    "NEXT_PAGE_TOKEN_FIELD",
    "PAGE_SIZE_FIELD",
    "PAGE_TOKEN_FIELD",
    "ROUTES",
    "SERVICE",
    "Route",
    "build_routes",
]

#: The service the gateway translates.
SERVICE: ServiceDescriptor = webhook_service_pb2.DESCRIPTOR.services_by_name["WebhookService"]

# Success statuses other than 200 (contract, section 5).
_SUCCESS_STATUS: dict[str, int] = {
    "CreateWebhook": 201,
    "DeleteWebhook": 204,
    # The recovery is queued, not done, when the call returns.
    "RecoverWebhook": 202,
}

# Responses answered as the named resource with the response's other fields beside it, each
# only when set: the created webhook plus the secret the service generated.
_FLATTEN: dict[str, str] = {
    "CreateWebhook": "webhook",
}

# Lists answered whole when the caller asks for no page (neither page_size nor page_token):
# the integrations tab reads a project's webhooks as one array and knows no paging.
_WHOLE_UNLESS_PAGED: frozenset[str] = frozenset({"ListWebhooks", "ListCopyableWebhooks"})

# Body keys a request needs, for the OpenAPI document; the server checks them either way.
_REQUIRED_BODY_KEYS: dict[str, tuple[str, ...]] = {
    "CreateWebhook": ("name", "url", "events"),
    "RecoverWebhook": ("start_time",),
}

_VARIABLE = re.compile(r"\{([a-z_][a-z0-9_]*)\}")
# The paging fields of list requests and responses (field names, not credentials).
PAGE_SIZE_FIELD = "page_size"
PAGE_TOKEN_FIELD = "page_token"  # noqa: S105
NEXT_PAGE_TOKEN_FIELD = "next_page_token"  # noqa: S105


@dataclass(frozen=True)
class Route:
    """One HTTP route onto one RPC."""

    method: MethodDescriptor
    #: The HTTP method, upper-case.
    http_method: str
    #: The path template, with ``{field}`` variables, as aiohttp writes them too.
    path: str
    #: The request fields bound from the path, in order.
    path_parameters: tuple[str, ...]
    #: ``"*"`` when the JSON body fills the request, else ``""`` (query parameters do).
    body: str
    #: The response field that is the whole HTTP body, or ``""`` for the whole response.
    response_body: str
    success_status: int
    #: The response field answered with the response's other fields beside it, or ``""``.
    flatten: str
    required_body_keys: tuple[str, ...]
    #: A list answered whole, page after page, when the request names no page.
    whole_unless_paged: bool

    @property
    def rpc_name(self) -> str:
        """The RPC's short name, for example ``ListWebhooks``."""
        return self.method.name

    @property
    def grpc_path(self) -> str:
        """The RPC's gRPC method path."""
        return f"/{self.method.containing_service.full_name}/{self.method.name}"

    @property
    def input_type(self) -> Descriptor:
        """The request message type."""
        return self.method.input_type

    @property
    def output_type(self) -> Descriptor:
        """The response message type."""
        return self.method.output_type

    @property
    def pages(self) -> bool:
        """Whether the response is a list whose next-page token goes in a header."""
        return bool(self.response_body) and NEXT_PAGE_TOKEN_FIELD in self.output_type.fields_by_name

    def body_field_names(self) -> tuple[str, ...]:
        """The REST keys a JSON body may set (the request's fields not bound by the path)."""
        if self.body != "*":
            return ()
        return tuple(
            field.name
            for field in rest_fields(self.input_type)
            if field.proto_name not in self.path_parameters
            and field.kind is not FieldKind.FIELD_MASK
        )

    def query_field_names(self) -> tuple[str, ...]:
        """The REST keys query parameters may set (scalars not bound by the path)."""
        if self.body == "*":
            return ()
        return tuple(
            field.name
            for field in rest_fields(self.input_type)
            if field.proto_name not in self.path_parameters
            and not field.repeated
            and field.kind
            in (FieldKind.STRING, FieldKind.INTEGER, FieldKind.BOOLEAN, FieldKind.ENUM)
        )


def build_routes(service: ServiceDescriptor) -> tuple[Route, ...]:
    """Every route of ``service``'s annotations, literal segments ordered before variables.

    aiohttp tries routes in the order they are added, so ``/webhooks/copyable`` must come
    before ``/webhooks/{webhook_id}`` or the variable would swallow it.
    """
    known = {method.name for method in service.methods}
    for table in (_SUCCESS_STATUS, _FLATTEN, _REQUIRED_BODY_KEYS, _WHOLE_UNLESS_PAGED):
        stale = set(table) - known
        if stale:
            raise RuntimeError(f"The gateway's tables name RPCs the service lacks: {stale}.")
    routes = [_route(method, rule) for method in service.methods for rule in _rules(method)]
    seen: set[tuple[str, str]] = set()
    for route in routes:
        key = (route.http_method, _shape(route.path))
        if key in seen:
            raise RuntimeError(f"Two RPCs claim {route.http_method} {route.path}.")
        seen.add(key)
    return tuple(sorted(routes, key=lambda route: _precedence(route.path)))


def _rules(method: MethodDescriptor) -> Iterator[http_pb2.HttpRule]:
    options = method.GetOptions()
    if not options.HasExtension(annotations_pb2.http):
        return
    rule = options.Extensions[annotations_pb2.http]
    yield rule
    yield from rule.additional_bindings


def _route(method: MethodDescriptor, rule: http_pb2.HttpRule) -> Route:
    name = method.name
    pattern = rule.WhichOneof("pattern")
    if pattern not in ("get", "post", "put", "patch", "delete"):
        raise RuntimeError(f"{name}: the gateway cannot serve a {pattern!r} HTTP rule.")
    path: str = getattr(rule, pattern)
    parameters = tuple(_VARIABLE.findall(path))
    if _VARIABLE.sub("", path).count("{") or _VARIABLE.sub("", path).count("}"):
        raise RuntimeError(f"{name}: only plain {{field}} path variables are served: {path}.")
    fields = method.input_type.fields_by_name
    for parameter in parameters:
        if parameter not in fields or fields[parameter].type != fields[parameter].TYPE_STRING:
            raise RuntimeError(f"{name}: path variable {parameter} is not a string field.")
    if rule.body not in ("", "*"):
        raise RuntimeError(f'{name}: the gateway serves only body "*" or no body.')
    response_body = rule.response_body
    outputs = method.output_type.fields_by_name
    if response_body and response_body not in outputs:
        raise RuntimeError(f"{name}: response_body {response_body!r} is not a response field.")
    flatten = _FLATTEN.get(name, "")
    if flatten and (response_body or flatten not in outputs):
        raise RuntimeError(f"{name}: cannot flatten {flatten!r} into the response.")
    if name in _WHOLE_UNLESS_PAGED and not (
        response_body and NEXT_PAGE_TOKEN_FIELD in outputs and PAGE_TOKEN_FIELD in fields
    ):
        raise RuntimeError(f"{name}: only a paged list can be answered whole.")
    return Route(
        method=method,
        http_method=pattern.upper(),
        path=path,
        path_parameters=parameters,
        body=rule.body,
        response_body=response_body,
        success_status=_SUCCESS_STATUS.get(name, 200),
        flatten=flatten,
        required_body_keys=_REQUIRED_BODY_KEYS.get(name, ()),
        whole_unless_paged=name in _WHOLE_UNLESS_PAGED,
    )


def _segments(path: str) -> Sequence[str]:
    return [segment for segment in path.split("/") if segment]


def _shape(path: str) -> str:
    """The path with variables erased: two paths of one shape match the same URLs."""
    return _VARIABLE.sub("{}", path)


def _precedence(path: str) -> tuple[tuple[int, str], ...]:
    # Segment by segment, a literal sorts before a variable.
    return tuple((1 if _VARIABLE.fullmatch(s) else 0, s) for s in _segments(path))


#: The gateway's routes, built once from the service's annotations.
ROUTES: tuple[Route, ...] = build_routes(SERVICE)
