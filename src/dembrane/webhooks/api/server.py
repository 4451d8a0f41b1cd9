"""The grpc.aio server: the three services, health, reflection and the auth interceptor."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

# The package's asyncio servicer; its type stubs do not declare the module.
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from grpc_reflection.v1alpha import reflection, reflection_pb2
from grpc_reflection.v1alpha._async import ReflectionServicer
from sqlalchemy import text
from sqlmodel import Session

from dembrane.webhooks.api.directory_service import DirectoryServicer
from dembrane.webhooks.api.event_service import EventServicer
from dembrane.webhooks.api.interceptor import Admission, AuthInterceptor
from dembrane.webhooks.api.webhook_service import WebhookServicer
from dembrane.webhooks.auth import TokenVerifier
from dembrane.webhooks.config import LISTEN_PROBLEMS, url_host
from dembrane.webhooks.resources import Resources
from dembrane.webhooks.store.database import Database, describe_store_error
from dembrane.webhooks.v1 import (
    directory_service_pb2,
    directory_service_pb2_grpc,
    event_service_pb2,
    event_service_pb2_grpc,
    webhook_service_pb2,
    webhook_service_pb2_grpc,
)

SERVICE_NAMES = (
    webhook_service_pb2.DESCRIPTOR.services_by_name["WebhookService"].full_name,
    event_service_pb2.DESCRIPTOR.services_by_name["EventService"].full_name,
    directory_service_pb2.DESCRIPTOR.services_by_name["DirectoryService"].full_name,
)

#: The released reflection service. Its messages are those of v1alpha, field for field (v1 was
#: v1alpha renamed), so the package's servicer answers both; clients such as grpcurl and
#: buf curl ask for v1 first.
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"

# Large enough for a batch of 500 events with transcripts, small enough to refuse abuse.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


#: How often health checks look at the store.
STORE_CHECK_SECONDS = 5.0

log = logging.getLogger(__name__)


def _ping(session: Session) -> None:
    """A write that changes nothing (the schema's version, set to itself): a store that
    answers reads but takes no writes (a full disk, a read-only file or server, a PostgreSQL
    standby) cannot take events either."""
    session.execute(text("UPDATE alembic_version SET version_num = version_num"))


class GrpcServer:
    """A started gRPC server and its health servicer, which follows the store's health."""

    def __init__(
        self,
        server: grpc.aio.Server,
        port: int,
        health_servicer: health_aio.HealthServicer,
        database: Database,
        admission: Admission,
    ) -> None:
        self.server = server
        self.port = port
        self.health = health_servicer
        self.admission = admission
        #: Whether the last look at the store found it taking writes.
        self.store_available = True
        self._watch = asyncio.create_task(self._watch_store(database), name="webhooks-health")

    async def _watch_store(self, database: Database) -> None:
        """Report NOT_SERVING while the store cannot be written to, SERVING again after.

        Without its store the service can neither take events nor deliver them, so load
        balancers and orchestrators should know, and clients should wait.
        """
        serving = True
        while True:
            await asyncio.sleep(STORE_CHECK_SECONDS)
            try:
                await asyncio.wait_for(database.run_relaxed(_ping), STORE_CHECK_SECONDS)
                healthy, detail = True, ""
            except Exception as error:
                healthy, detail = False, describe_store_error(error)
            self.store_available = healthy
            if healthy == serving:
                continue
            serving = healthy
            status = health_pb2.HealthCheckResponse.SERVING
            if healthy:
                log.info("health: SERVING again, the store takes writes")
            else:
                status = health_pb2.HealthCheckResponse.NOT_SERVING
                log.warning("health: NOT_SERVING, the store is unavailable (%s)", detail)
            for name in (*SERVICE_NAMES, ""):
                await self.health.set(name, status)

    async def announce_stop(self) -> None:
        """Report NOT_SERVING from now on, for good, while calls are still taken."""
        self._watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._watch
        await self.health.enter_graceful_shutdown()

    async def drain(self, deadline: float) -> None:
        """Report NOT_SERVING and take no more calls (they get UNAVAILABLE); return once
        those in flight have finished and calls stopped arriving, or at ``deadline`` (the
        loop's clock). The server still answers meanwhile; ``stop`` ends it."""
        await self.announce_stop()
        # gRPC's shutdown would cancel the calls it holds but has not handed over yet; they
        # are handed over, and refused, before it begins.
        await self.admission.close(deadline)

    async def stop(self, grace: float) -> None:
        """``drain``, then stop gRPC; after ``grace`` seconds in all, calls still running
        are cancelled."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        if self.admission.open:
            await self.drain(deadline)
        await self.server.stop(max(deadline - loop.time(), 0.0))


class _ReflectionServicer(ReflectionServicer):  # type: ignore[misc]
    """The package's reflection service, also finding the file of a method's full name
    (``package.Service.Method``), as the reflection protocol allows and ``grpcurl describe``
    asks; this protobuf runtime's pool finds services and messages only."""

    def _file_containing_symbol(self, request: Any, fully_qualified_name: str) -> Any:
        service, _, method = fully_qualified_name.rpartition(".")
        try:
            self._pool.FindMethodByName(fully_qualified_name)
        except KeyError:
            return super()._file_containing_symbol(request, fully_qualified_name)
        return super()._file_containing_symbol(request, service if method else fully_qualified_name)


class _HealthServicer(health_aio.HealthServicer):  # type: ignore[misc]
    """The package's asyncio health service, with ``List`` (which it leaves unimplemented
    though reflection shows it): every service name and its status."""

    async def List(  # noqa: N802 - the RPC's name
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthListResponse:
        response = health_pb2.HealthListResponse()
        for name, status in sorted(self._server_status.items()):
            response.statuses[name].status = status
        return response


def _add_generic(server: grpc.aio.Server, add: Callable[[Any, Any], None], servicer: Any) -> None:
    """Serve ``servicer`` with the generated ``add_*_to_server`` function ``add``, through
    its generic handler alone (see ``_GenericHandlersOnly``)."""
    add(servicer, _GenericHandlersOnly(server))


class _GenericHandlersOnly:
    """The server as the generated ``add_*_to_server`` functions see it: their generic
    handler is added, their registered methods are not.

    gRPC's asyncio server keeps one pending request per registered method and, for every
    call it accepts, waits on all of them at once (``asyncio.wait``): a cost on the event
    loop that grows with the number of methods (about two dozen here). Served through the generic
    handlers alone, each call costs one pending request, whatever the number of methods.
    """

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, _service: str, _handlers: Any) -> None:
        """Left out: the generic handler added with them serves the same methods."""


async def start_grpc_server(resources: Resources, host: str, port: int) -> GrpcServer:
    """Build and start the server on ``host:port`` (port 0 picks a free one)."""
    interceptor = AuthInterceptor(TokenVerifier(resources.settings))
    server = grpc.aio.server(
        interceptors=[interceptor],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
            # Backends keep idle connections alive with pings, Go's gRPC every 10 s at the
            # most. gRPC's own limit (one every 5 minutes) would answer the third with
            # GOAWAY "too_many_pings" and drop the connection.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ],
    )
    _add_generic(
        server,
        webhook_service_pb2_grpc.add_WebhookServiceServicer_to_server,
        WebhookServicer(resources),
    )
    _add_generic(
        server, event_service_pb2_grpc.add_EventServiceServicer_to_server, EventServicer(resources)
    )
    _add_generic(
        server,
        directory_service_pb2_grpc.add_DirectoryServiceServicer_to_server,
        DirectoryServicer(resources),
    )
    # The asyncio servicer: the threaded one parks a thread per Watch stream in the loop's
    # default executor and never frees it when the stream is cancelled, so a few open
    # watches would stall every Check and keep the process from exiting.
    health_servicer = _HealthServicer()
    _add_generic(server, health_pb2_grpc.add_HealthServicer_to_server, health_servicer)
    for name in (*SERVICE_NAMES, ""):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    _add_reflection(server)
    # gRPC logs an error line of its own before it fails to bind; ours is the one to read.
    problem = _bind_problem(host, port)
    bound = 0
    if problem is None:
        try:
            bound = server.add_insecure_port(f"{url_host(host)}:{port}")
        except RuntimeError:  # what grpcio raises when it cannot bind
            bound = 0
    if bound == 0:
        await server.stop(None)
        problem = problem or "the port is taken, or the address is not one of this machine's"
        raise OSError(f"Cannot listen for gRPC on {host}:{port}: {problem}.")
    await server.start()
    return GrpcServer(server, bound, health_servicer, resources.database, interceptor.admission)


def _register_reflection_v1() -> None:
    """Put grpc.reflection.v1's descriptor in the default pool, so it can be described too.

    Derived from the v1alpha descriptor the package ships: same messages, other package.
    """
    pool = descriptor_pool.Default()
    try:
        pool.FindServiceByName(REFLECTION_V1)
        return  # already there (a newer package, or a second server in this process)
    except KeyError:
        pass
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    file = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(file)
    file.name = "grpc/reflection/v1/reflection.proto"
    file.package = "grpc.reflection.v1"
    file.ClearField("options")
    for message in file.message_type:
        for message_field in message.field:
            if message_field.HasField("type_name"):
                message_field.type_name = message_field.type_name.replace(old, new)
    for service in file.service:
        for method in service.method:
            method.input_type = method.input_type.replace(old, new)
            method.output_type = method.output_type.replace(old, new)
    pool.Add(file)


def _add_reflection(server: grpc.aio.Server) -> None:
    """Serve reflection as grpc.reflection.v1 and v1alpha, from one servicer."""
    _register_reflection_v1()
    servicer = _ReflectionServicer(
        (*SERVICE_NAMES, health.SERVICE_NAME, REFLECTION_V1, reflection.SERVICE_NAME)
    )
    for service in (REFLECTION_V1, reflection.SERVICE_NAME):
        method = grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, {"ServerReflectionInfo": method}),)
        )


def _bind_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on, when a trial bind says so; else None (any
    other doubt is left to gRPC)."""
    try:
        addresses = socket.getaddrinfo(
            host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (OSError, UnicodeError):
        return None
    for family, kind, proto, _name, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            # As gRPC binds: a port whose last connections linger in TIME_WAIT is free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as error:
                problem = LISTEN_PROBLEMS.get(error.errno or 0)
                if problem is not None and (port != 0 or error.errno != errno.EADDRINUSE):
                    return problem
    return None
