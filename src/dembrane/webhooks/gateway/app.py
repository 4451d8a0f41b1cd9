"""The aiohttp application of the REST gateway.

The gateway is an ordinary client of the gRPC API: it turns each HTTP request into the
RPC its route names, forwards the caller's ``Authorization`` header as metadata, and turns
the answer (or the status) back into the JSON of the contract. It holds no business rule of
its own, so it could be replaced by any gRPC-JSON transcoder that honours the same mapping.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
import traceback
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
from aiohttp import hdrs, web
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    PayloadEncodingError,
)
from aiohttp.typedefs import Middleware
from aiohttp.web_log import AccessLogger
from aiohttp.web_request import BaseRequest
from google.protobuf import message_factory
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dembrane.webhooks import metrics
from dembrane.webhooks.auth import MAX_AUTHORIZATION_LENGTH, TokenVerifier
from dembrane.webhooks.config import LISTEN_PROBLEMS, url_host
from dembrane.webhooks.domain.errors import Unauthenticated
from dembrane.webhooks.gateway.errors import (
    INVALID_SESSION,
    ErrorAnswer,
    RestError,
    answer_for_rpc_error,
    local_answer,
)
from dembrane.webhooks.gateway.json_mapping import (
    FieldKind,
    message_to_json,
    parse_body,
    rest_field_path,
    rest_fields,
    set_from_json,
    set_from_query,
    set_path_parameter,
)
from dembrane.webhooks.gateway.openapi import PAGE_TOKEN_HEADER, build_openapi
from dembrane.webhooks.gateway.routes import (
    NEXT_PAGE_TOKEN_FIELD,
    PAGE_SIZE_FIELD,
    PAGE_TOKEN_FIELD,
    ROUTES,
    SERVICE,
    Route,
)

__all__ = ["MAX_BODY_BYTES", "announce_stop", "bound_port", "create_app", "run_gateway"]

_log = logging.getLogger(__name__)


# What is wrong with a request aiohttp cannot parse, by the kind of its error, the most
# specific first. aiohttp's own messages quote the offending bytes (a header line, bearer
# token and all), so nothing the gateway logs or answers about such a request uses them.
_PARSE_FAULTS: tuple[tuple[type[HttpProcessingError], str], ...] = (
    (LineTooLong, "A line of the request head (the request line or a header) is too long."),
    (BadHttpMethod, "The request line names no valid HTTP method."),
    (BadStatusLine, "The request line is malformed."),
    (InvalidURLError, "The request target is not a valid URL."),
    (InvalidHeader, "A request header has an invalid name or value."),
    (PayloadEncodingError, "The request body is not framed as its headers say."),
)
_PARSE_FAULT = "The request is not valid HTTP/1.1."


def _parse_fault(error: HttpProcessingError) -> str:
    """A fixed sentence for what is wrong with an unparseable request, quoting none of it."""
    return next((fault for kind, fault in _PARSE_FAULTS if isinstance(error, kind)), _PARSE_FAULT)


class _MalformedRequestFilter(logging.Filter):
    """aiohttp logs a request it cannot parse (a header over 8 kB, a broken chunk) at ERROR
    with a traceback, before any handler runs; it is the client's fault, so one INFO line.

    The line names the kind of fault, never aiohttp's message: that quotes the bytes at fault,
    which may be an ``Authorization`` header with a valid token in it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.msg = "refused a request from %s that is not valid HTTP (%s): %s"
            record.args = (remote, type(error).__name__, _parse_fault(error))
            record.exc_info = record.exc_text = None
            level = min(record.levelno, logging.INFO)  # aiohttp logs some at DEBUG already
            record.levelno, record.levelname = level, logging.getLevelName(level)
        return True


logging.getLogger("aiohttp.server").addFilter(_MalformedRequestFilter())

#: The largest request body the gateway reads; anything bigger is answered with 413.
MAX_BODY_BYTES = 1024 * 1024
_BODY_TOO_LARGE = "Request body is larger than 1 MiB."

# The content codings a request body may have beside identity, with their zlib window bits.
_BODY_CODINGS: dict[str, int] = {
    "gzip": 16 + zlib.MAX_WBITS,
    "x-gzip": 16 + zlib.MAX_WBITS,
    "deflate": zlib.MAX_WBITS,
}
_UNSUPPORTED_CODING = "The request body's Content-Encoding must be gzip, deflate or identity."
_ACCEPT_ENCODING = {"Accept-Encoding": "gzip, deflate, identity"}

# The Test action waits for the receiver (30 s by default) before it answers.
DEFAULT_RPC_TIMEOUT = 60.0
_HEALTH_TIMEOUT = 5.0

_INTERNAL_ERROR = "Internal error"
_CONNECTION_LOST = "The connection ended before the whole request arrived."
_NO_STORE = "no-store"
_DOCUMENT_CACHING = "public, max-age=300"
_SEVERAL_AUTHORIZATIONS = (
    "The request carries more than one Authorization header; send exactly one."
)

_CORS_METHODS = "GET, POST, PATCH, DELETE, OPTIONS"
_CORS_HEADERS = "Authorization, Content-Type"
_CORS_MAX_AGE = "600"

# The FieldMask an Update request carries; a PATCH body's keys become its paths.
_MASK_FIELD = "update_mask"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class _Upstream:
    """The gRPC side of the gateway: the target, and the channel once the app runs."""

    target: str
    timeout: float
    channel: grpc.aio.Channel | None = None
    owns_channel: bool = False
    #: Set once the gateway begins to stop: ``/healthz`` answers 503 from then on.
    stopping: bool = False
    calls: dict[str, grpc.aio.UnaryUnaryMultiCallable[Message, Message]] = field(
        default_factory=dict
    )

    def open(self) -> None:
        if self.channel is None:
            # Created here, inside the running loop, because grpc.aio binds channels to it.
            self.channel = grpc.aio.insecure_channel(self.target)
            self.owns_channel = True
        for route in ROUTES:
            request_class = message_factory.GetMessageClass(route.input_type)
            response_class = message_factory.GetMessageClass(route.output_type)
            self.calls[route.grpc_path] = self.channel.unary_unary(
                route.grpc_path,
                # The concrete class's method: the base Message's is abstract.
                request_serializer=request_class.SerializeToString,
                response_deserializer=response_class.FromString,
            )

    async def close(self) -> None:
        if self.channel is not None and self.owns_channel:
            await self.channel.close(grace=None)
        self.channel = None
        self.owns_channel = False
        self.calls.clear()

    async def call(self, route: Route, request: Message, authorization: str | None) -> Message:
        metadata = (("authorization", authorization),) if authorization else ()
        return await self.calls[route.grpc_path](request, timeout=self.timeout, metadata=metadata)

    async def serving(self) -> bool:
        if self.channel is None:
            return False
        stub = health_pb2_grpc.HealthStub(self.channel)
        try:
            # The service the gateway calls, not the server as a whole: a server that is up
            # but does not serve WebhookService is of no use to the gateway.
            reply = await stub.Check(
                health_pb2.HealthCheckRequest(service=SERVICE.full_name), timeout=_HEALTH_TIMEOUT
            )
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


_UPSTREAM = web.AppKey("upstream", _Upstream)
_DOCUMENT = web.AppKey("openapi_document", bytes)
# The resources of the API's routes: every one of them needs a bearer token.
_API_RESOURCES = web.AppKey("api_resources", frozenset)
_VERIFIER = web.AppKey("token_verifier", TokenVerifier)


class _KeyMismatch:
    """Says, at most once a minute, that the server refused a token this gateway accepted.

    With the same ``WEBHOOKS_JWT_*`` settings on both sides that does not happen (short of
    a token expiring between the two checks), so it means the settings differ, which
    callers only ever see as "Invalid session".
    """

    def __init__(self, every: float = 60.0) -> None:
        self._every = every
        self._last = float("-inf")

    def refused(self) -> None:
        now = time.monotonic()
        if now - self._last >= self._every:
            self._last = now
            _log.warning(
                "the gRPC server refused a token this gateway accepted: give both the same "
                "WEBHOOKS_JWT_* settings (secret or public key, issuer, audience)"
            )


_KEY_MISMATCH = web.AppKey("key_mismatch", _KeyMismatch)


def create_app(
    *,
    grpc_target: str,
    cors_origins: Sequence[str] = (),
    channel: grpc.aio.Channel | None = None,
    rpc_timeout: float = DEFAULT_RPC_TIMEOUT,
    verifier: TokenVerifier | None = None,
) -> web.Application:
    """The gateway application, calling the gRPC API at ``grpc_target``.

    The application opens one channel when it starts and closes it when it stops, unless
    ``channel`` is given, which then stays the caller's to close. ``cors_origins`` lists the
    browser origins allowed to call the API (``*`` allows any). With a ``verifier`` holding
    the server's keys, a token that is not valid (expired, forged, malformed) is answered
    401 before anything else about the request is looked at, as a missing one is; without
    one, the server judges tokens, after the gateway has read the request.
    """
    middlewares: list[Middleware] = [_no_store_middleware, _error_middleware]
    if cors_origins:
        middlewares.insert(0, _cors_middleware(cors_origins))
    app = web.Application(
        client_max_size=MAX_BODY_BYTES,
        middlewares=middlewares,
        # Bodies are decoded by _read_body, which answers a bad or unknown encoding itself;
        # aiohttp's decoder would fail before the handler with a plain-text 400 or a 500.
        handler_args={"auto_decompress": False},
    )
    app[_UPSTREAM] = _Upstream(target=grpc_target, timeout=rpc_timeout, channel=channel)
    app[_DOCUMENT] = json.dumps(build_openapi(ROUTES), indent=2).encode()
    app.cleanup_ctx.append(_upstream_context)

    resources: dict[str, web.Resource] = {}
    for route in ROUTES:  # already ordered so that literal segments win over variables
        if route.path not in resources:
            resources[route.path] = app.router.add_resource(route.path)
        handler = _route_handler(route)
        resources[route.path].add_route(route.http_method, handler)
        if route.http_method == "GET":
            # HEAD answers as GET would, without the body (aiohttp leaves it out).
            resources[route.path].add_route("HEAD", handler)
    app[_API_RESOURCES] = frozenset(resources.values())
    if verifier is not None and verifier.configured:
        app[_VERIFIER] = verifier
        app[_KEY_MISMATCH] = _KeyMismatch()
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/api/openapi.json", _openapi_document)
    return app


class _AccessLog(AccessLogger):
    """aiohttp's access log, less the health probes and metrics scrapes that succeed: an
    orchestrator probing every few seconds would otherwise fill the log with them."""

    def log(self, request: BaseRequest, response: web.StreamResponse, time: float) -> None:
        if request.path in _QUIET_PATHS and response.status == 200:
            return
        super().log(request, response, time)


_QUIET_PATHS = frozenset({"/healthz", "/metrics"})


class _JsonRefusalHandler(web.RequestHandler):
    """aiohttp's connection handler, answering what it refuses on its own in the gateway's JSON.

    A request aiohttp cannot parse never reaches the application or its middlewares: aiohttp
    answers it from ``handle_error`` with a plain-text 400 whose body is the parser's message,
    and that quotes the bytes at fault (a bearer token, for one). aiohttp has no setting for
    that answer, so this subclass replaces it with ``{"detail", "reason"}`` and a fixed
    sentence.
    """

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # aiohttp's own still logs the failure (see _MalformedRequestFilter) and raises when
        # part of an answer is out already; only the answer it builds is discarded.
        super().handle_error(request, status, exc, None)
        detail = _parse_fault(exc) if isinstance(exc, HttpProcessingError) else _INTERNAL_ERROR
        response = _error_response(local_answer(status, detail), {hdrs.CACHE_CONTROL: _NO_STORE})
        response.force_close()
        return response


class _JsonRefusalServer(web.Server):
    """aiohttp's server, with :class:`_JsonRefusalHandler` for every connection."""

    def __call__(self) -> web.RequestHandler:
        return _JsonRefusalHandler(self, loop=self._loop, **self._kwargs)


class _GatewayRunner(web.AppRunner):
    """aiohttp's runner for the app, serving through :class:`_JsonRefusalServer`.

    aiohttp takes no connection handler class as a setting: the server it builds for the app
    (after the app's startup) creates its own, so that server is given the subclass above.
    """

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _JsonRefusalServer
        return server


async def run_gateway(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Start serving ``app`` on ``host:port`` (port 0 picks a free one); see :func:`bound_port`.

    The caller stops it with ``await runner.cleanup()``.
    """
    runner = _GatewayRunner(app, handle_signals=False, access_log_class=_AccessLog)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as error:
        await runner.cleanup()
        problem = LISTEN_PROBLEMS.get(error.errno or 0, error.strerror or str(error))
        raise OSError(f"Cannot listen for REST on {url_host(host)}:{port}: {problem}.") from None
    except BaseException:
        await runner.cleanup()
        raise
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """The TCP port a started runner listens on."""
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    raise RuntimeError("The gateway is not listening on a TCP port.")


async def _upstream_context(app: web.Application) -> AsyncIterator[None]:
    upstream = app[_UPSTREAM]
    upstream.open()
    try:
        yield
    finally:
        await upstream.close()


# --- routes -------------------------------------------------------------------------------


def _route_handler(route: Route) -> Handler:
    request_class = message_factory.GetMessageClass(route.input_type)
    skip = frozenset(route.path_parameters)
    mask_names = {f.name: f.proto_name for f in rest_fields(route.input_type)}
    has_mask = _MASK_FIELD in route.input_type.fields_by_name
    changeable = ", ".join(
        n for n, proto in mask_names.items() if n not in skip and proto != _MASK_FIELD
    )
    # The server names the fields of its violations in proto names; REST callers sent others.
    rest_name = functools.partial(rest_field_path, route.input_type)

    async def handle(request: web.Request) -> web.StreamResponse:
        message = request_class()
        for name in route.path_parameters:
            set_path_parameter(message, name, request.match_info[name])
        if route.body == "*":
            body = parse_body(await _read_body(request))
            given = set_from_json(message, body, skip=skip)
            if has_mask:
                # The keys present in a PATCH body are the fields to change.
                if not given:
                    raise RestError(
                        400,
                        "The request body names no field to change; "
                        f"give one or more of {changeable}.",
                    )
                getattr(message, _MASK_FIELD).paths.extend(mask_names[n] for n in given)
        else:
            set_from_query(message, request.query, skip=skip)
        upstream, authorization = request.app[_UPSTREAM], _authorization(request)
        try:
            answer = await upstream.call(route, message, authorization)
            if route.whole_unless_paged and not _names_a_page(request):
                answer = await _remaining_pages(upstream, route, message, answer, authorization)
        except grpc.aio.AioRpcError as error:
            mismatch = request.app.get(_KEY_MISMATCH)
            if mismatch is not None and error.code() is grpc.StatusCode.UNAUTHENTICATED:
                mismatch.refused()
            return _error_response(answer_for_rpc_error(error, rest_name))
        return _render(route, answer)

    handle.__name__ = route.rpc_name
    return handle


async def _read_body(request: web.Request) -> bytes:
    """The request body, decoded as its Content-Encoding says.

    Both the body as sent and the decoded body are limited to ``MAX_BODY_BYTES``.
    """
    header = ",".join(request.headers.getall(hdrs.CONTENT_ENCODING, ()))
    codings = [coding.strip().lower() for coding in header.split(",")]
    codings = [coding for coding in codings if coding not in ("", "identity")]
    if any(coding not in _BODY_CODINGS for coding in codings):
        raise RestError(415, _UNSUPPORTED_CODING)
    body = await request.read()
    for coding in reversed(codings):  # the coding applied last is undone first
        body = _decode(body, coding)
    return body


def _decode(data: bytes, coding: str) -> bytes:
    """``data`` decoded from one content coding; 413 once the output passes the limit."""
    undecodable = f"The request body could not be decoded as its Content-Encoding ({coding}) says."
    decoded = bytearray()
    while data:  # a gzip body may hold several members, one after the other
        wbits = _BODY_CODINGS[coding]
        if coding == "deflate" and data[0] & 0x0F != 8:
            wbits = -wbits  # deflate without the zlib header, as some clients send it
        decoder = zlib.decompressobj(wbits)
        try:
            decoded += decoder.decompress(data, MAX_BODY_BYTES + 1 - len(decoded))
        except zlib.error:
            raise RestError(400, undecodable) from None
        if len(decoded) > MAX_BODY_BYTES:
            raise RestError(413, _BODY_TOO_LARGE)
        if not decoder.eof:  # the data stopped before the end of the stream
            raise RestError(400, undecodable)
        data = decoder.unused_data
    return bytes(decoded)


def _names_a_page(request: web.Request) -> bool:
    return PAGE_SIZE_FIELD in request.query or PAGE_TOKEN_FIELD in request.query


async def _remaining_pages(
    upstream: _Upstream,
    route: Route,
    message: Message,
    answer: Message,
    authorization: str | None,
) -> Message:
    """``answer`` with the items of every following page added, and no next-page token."""
    items = getattr(answer, route.response_body)
    token: str = getattr(answer, NEXT_PAGE_TOKEN_FIELD)
    while token:
        setattr(message, PAGE_TOKEN_FIELD, token)
        page = await upstream.call(route, message, authorization)
        items.extend(getattr(page, route.response_body))
        token = getattr(page, NEXT_PAGE_TOKEN_FIELD)
    setattr(answer, NEXT_PAGE_TOKEN_FIELD, "")
    return answer


def _credentials_refusal(request: web.Request) -> ErrorAnswer | None:
    """The 401 for a request to an API route without exactly one Authorization header the
    server could take, or (when the gateway has the server's keys) with a token that is not
    valid; None for any other request.

    Such a request is answered before its size, encoding, body or query is looked at: a
    caller without credentials learns nothing about the rest of its request, and a request
    that is wrong in several ways gets the same first answer whichever it is. Several
    headers are refused rather than one picked: a proxy or client library that adds its own
    would otherwise decide, unseen, whose request this is.
    """
    route = request.match_info.route
    if route.resource not in request.app[_API_RESOURCES]:
        return None
    refusal = local_answer(401, INVALID_SESSION)
    if len(request.headers.getall(hdrs.AUTHORIZATION, ())) > 1:
        return replace(refusal, field_violations=((hdrs.AUTHORIZATION, _SEVERAL_AUTHORIZATIONS),))
    authorization = _authorization(request)
    if authorization is None:
        return refusal
    verifier = request.app.get(_VERIFIER)
    if verifier is not None:
        # Only the token itself: whether its user may do this is the server's to say.
        try:
            verifier.verify_header(authorization)
        except Unauthenticated:
            return refusal
    return None


def _authorization(request: web.Request) -> str | None:
    value = request.headers.get("Authorization", "").strip()
    # gRPC metadata must be printable ASCII, and the server takes no value over its limit
    # (shared with it, so that a token works the same way over REST and gRPC); anything else
    # could not be a valid token anyway, and the gateway answers 401 for it itself, as the
    # server does for a missing header (see _lacks_credentials).
    # Nor could a value that is not "Bearer" and a token.
    scheme, _, token = value.partition(" ")
    if (
        not value
        or len(value) > MAX_AUTHORIZATION_LENGTH
        or not (value.isascii() and value.isprintable())
        or scheme.lower() != "bearer"
        or not token.strip()
    ):
        return None
    return value


def _render(route: Route, answer: Message) -> web.StreamResponse:
    if route.success_status == 204:
        return web.Response(status=204)
    headers: dict[str, str] = {}
    data: Any
    if route.response_body:
        field = next(
            f for f in rest_fields(route.output_type) if f.proto_name == route.response_body
        )
        value = getattr(answer, route.response_body)
        if field.kind is FieldKind.MESSAGE and field.repeated:
            data = [message_to_json(item) for item in value]
        elif field.kind is FieldKind.MESSAGE:
            data = message_to_json(value)
        else:
            data = message_to_json(answer)[field.name]
        token = getattr(answer, NEXT_PAGE_TOKEN_FIELD, "") if route.pages else ""
        if token:
            headers[PAGE_TOKEN_HEADER] = token
    elif route.flatten:
        data = message_to_json(getattr(answer, route.flatten))
        extras = message_to_json(answer)
        for field in rest_fields(route.output_type):
            # Only when set: the secret appears in the 201 body only if the service made it.
            if field.proto_name != route.flatten and extras[field.name]:
                data[field.name] = extras[field.name]
    else:
        data = message_to_json(answer)
    return web.json_response(data, status=route.success_status, headers=headers)


def announce_stop(app: web.Application) -> None:
    """Answer ``/healthz`` with 503 from now on, while the routes still serve."""
    app[_UPSTREAM].stopping = True


async def _healthz(request: web.Request) -> web.StreamResponse:
    upstream = request.app[_UPSTREAM]
    if upstream.stopping:
        return web.json_response(
            {"status": "unavailable", "detail": "The gateway is shutting down."}, status=503
        )
    if await upstream.serving():
        return web.json_response({"status": "ok"})
    return web.json_response(
        {"status": "unavailable", "detail": "The webhook service is not serving."}, status=503
    )


async def _metrics(request: web.Request) -> web.StreamResponse:
    """This process's metrics in the Prometheus text format (with ``serve``, the
    dispatcher's and the publish calls' too)."""
    response = web.Response(body=metrics.exposition())
    response.headers["Content-Type"] = metrics.CONTENT_TYPE
    return response


async def _openapi_document(request: web.Request) -> web.StreamResponse:
    """The OpenAPI document: the same for every caller and free of secrets, so caches may
    keep it for a while (it changes only with a release)."""
    response = web.Response(body=request.app[_DOCUMENT], content_type="application/json")
    response.headers[hdrs.CACHE_CONTROL] = _DOCUMENT_CACHING
    return response


# --- middlewares ----------------------------------------------------------------------------


def _error_response(answer: ErrorAnswer, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(answer.body(), status=answer.status, headers=headers)


@web.middleware
async def _no_store_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """``Cache-Control: no-store`` on every answer whose route does not say otherwise.

    API answers are the caller's own, and some carry a signing secret (a created webhook's,
    the secret route's, a rotation's): no cache, shared or private, may keep them. Health
    and metrics must be read live anyway.
    """
    response = await handler(request)
    response.headers.setdefault(hdrs.CACHE_CONTROL, _NO_STORE)
    return response


@web.middleware
async def _error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes ``{"detail": ...}``; nothing a caller sends leads to a traceback."""
    refusal = _credentials_refusal(request)
    if refusal is not None:
        return _error_response(refusal)
    length = request.content_length
    if length is not None and length > MAX_BODY_BYTES:
        return _error_response(local_answer(413, _BODY_TOO_LARGE))
    try:
        return await handler(request)
    except RestError as error:
        # RFC 7694: a 415 for a content coding says which codings the gateway takes.
        headers = _ACCEPT_ENCODING if error.status == 415 else None
        answer = local_answer(error.status, error.detail, error.field_name)
        return _error_response(answer, headers=headers)
    except web.HTTPRequestEntityTooLarge:
        return _error_response(local_answer(413, _BODY_TOO_LARGE))
    except web.HTTPMethodNotAllowed as error:
        allow = {"Allow": ", ".join(sorted(error.allowed_methods))}
        return _error_response(local_answer(405, "Method not allowed"), headers=allow)
    except web.HTTPNotFound:
        return _error_response(local_answer(404, "Not found"))
    except web.HTTPException as error:
        if error.status < 400:
            raise
        return _error_response(local_answer(error.status, error.reason))
    except asyncio.CancelledError:
        raise
    except ConnectionResetError as error:
        # The caller went away (aiohttp says so when a body breaks off): its fault, not ours,
        # and nobody is left to read an answer.
        _log.info(
            "%s %s: the client's connection ended before the request did (%s)",
            request.method,
            request.path,
            type(error).__name__,
        )
        return _error_response(local_answer(400, _CONNECTION_LOST))
    except Exception as error:
        # The message of an unexpected error may quote request data (a secret, a token), so
        # only its type and the code path are logged.
        frames = "".join(traceback.format_tb(error.__traceback__))
        _log.error(
            "unexpected %s in %s %s\n%s",
            type(error).__name__,
            request.method,
            request.path,
            frames,
        )
        return _error_response(local_answer(500, _INTERNAL_ERROR))


def _cors_middleware(origins: Sequence[str]) -> Middleware:
    """CORS for the configured origins, so the integrations tab can call from the browser.

    A listed origin may send credentials (the platform's front end makes its requests with
    them, and a browser drops an answer to such a request without this consent); ``*``
    never gets that consent. The gateway itself reads no cookies, only bearer tokens.
    """
    allow_any = "*" in origins
    allowed = frozenset(origins)

    @web.middleware
    async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        listed = origin is not None and origin in allowed
        permitted = listed or (origin is not None and allow_any)
        credentials = {"Access-Control-Allow-Credentials": "true"} if listed else {}
        if (
            permitted
            and request.method == "OPTIONS"
            and "Access-Control-Request-Method" in request.headers
        ):
            return web.Response(
                status=204,
                headers={
                    "Access-Control-Allow-Origin": str(origin),
                    "Access-Control-Allow-Methods": _CORS_METHODS,
                    "Access-Control-Allow-Headers": _CORS_HEADERS,
                    "Access-Control-Max-Age": _CORS_MAX_AGE,
                    "Vary": "Origin",
                    **credentials,
                },
            )
        response = await handler(request)
        # Answers differ by Origin, so caches must key on it even when this one is refused.
        response.headers.add("Vary", "Origin")
        if permitted:
            response.headers["Access-Control-Allow-Origin"] = str(origin)
            response.headers["Access-Control-Expose-Headers"] = PAGE_TOKEN_HEADER
            response.headers.update(credentials)
        return response

    return cors
