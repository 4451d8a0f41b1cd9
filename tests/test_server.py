"""The server as operators and tools meet it: reflection, health, start-up and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import NoReturn

import aiohttp
import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.exc import OperationalError

from dembrane.webhooks.api import server as server_module
from dembrane.webhooks.auth import SCOPE_DIRECTORY, SCOPE_PUBLISH, mint_token
from dembrane.webhooks.service import Parts, Service, StartupError
from dembrane.webhooks.store.database import FILE_CHECK_SECONDS
from dembrane.webhooks.v1 import (
    directory_service_pb2 as dpb,
)
from dembrane.webhooks.v1 import (
    directory_service_pb2_grpc,
    event_pb2,
    event_service_pb2_grpc,
    webhook_pb2,
    webhook_service_pb2_grpc,
)
from dembrane.webhooks.v1 import event_service_pb2 as epb
from dembrane.webhooks.v1 import (
    webhook_service_pb2 as pb,
)

from grpc_helpers import rich_error
from harness import JWT_SECRET, Stubs, Tokens, World, make_settings, seed_world
from receiver import Receiver, Reply, unused_port


async def _list_services(channel: grpc.aio.Channel) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    async for response in call:
        return {s.name for s in response.list_services_response.service}
    return set()


async def _reflect_v1(
    channel: grpc.aio.Channel, requests: list[reflection_pb2.ServerReflectionRequest]
) -> list[reflection_pb2.ServerReflectionResponse]:
    """Ask grpc.reflection.v1, whose messages are v1alpha's on the wire."""
    info = channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    return [response async for response in info(iter(requests))]


async def test_reflection_v1_lists_and_describes_every_service(stubs: Stubs) -> None:
    """The released v1 protocol, which grpcurl and buf curl try first, answers too, and every
    service it lists (v1 reflection itself included) can be described."""
    (listing,) = await _reflect_v1(
        stubs.channel, [reflection_pb2.ServerReflectionRequest(list_services="")]
    )
    names = {s.name for s in listing.list_services_response.service}
    assert {
        "dembrane.webhooks.v1.EventService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    } <= names
    answers = await _reflect_v1(
        stubs.channel,
        [reflection_pb2.ServerReflectionRequest(file_containing_symbol=name) for name in names],
    )
    assert len(answers) == len(names)
    for name, answer in zip(names, answers, strict=True):
        assert answer.WhichOneof("message_response") == "file_descriptor_response", name


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


async def test_each_call_of_a_method_is_authenticated_on_its_own(
    stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """A method's handler is found once and then reused: every later call of it is still
    checked for its own token and scope, and a method the server lacks stays UNIMPLEMENTED."""
    directory = stubs.directory
    request = dpb.UpsertWorkspaceRequest(
        workspace_id=world.paid_workspace, name="Paid", tier="changemaker"
    )
    good = tokens.bearer(tokens.service(SCOPE_DIRECTORY))
    wrong_scope = tokens.bearer(tokens.service(SCOPE_PUBLISH))
    for _ in range(2):
        assert not (await directory.UpsertWorkspace(request, metadata=good)).created
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await directory.UpsertWorkspace(request)
        assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as scoped:
            await directory.UpsertWorkspace(request, metadata=wrong_scope)
        assert scoped.value.code() == grpc.StatusCode.PERMISSION_DENIED
        unknown = stubs.channel.unary_unary("/dembrane.webhooks.v1.DirectoryService/Nothing")
        with pytest.raises(grpc.aio.AioRpcError) as absent:
            await unknown(b"", metadata=good)
        assert absent.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_cancelled_health_watches_leave_health_checks_working(stubs: Stubs) -> None:
    """Watch streams opened and cancelled (more than the default thread pool's threads) hold
    nothing back: later watches and checks still answer at once."""
    health = health_pb2_grpc.HealthStub(stubs.channel)
    for _ in range(2 * ((os.cpu_count() or 1) + 4)):
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
        first = await asyncio.wait_for(watch.read(), timeout=5)
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
    response = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_an_undecodable_request_is_invalid_argument(
    stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """Bytes that are not the method's message (broken wire format, a string that is not
    UTF-8) get INVALID_ARGUMENT with ErrorInfo, after authentication, never UNKNOWN."""
    call = stubs.channel.unary_unary(
        "/dembrane.webhooks.v1.WebhookService/ListWebhooks",
        request_serializer=None,
        response_deserializer=None,
    )
    admin = tokens.bearer(tokens.user("u-admin"))
    for raw in (b"\xff\xff\xff\xff", b"\x0a\x02\xc3\x28"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(raw, metadata=admin)
        error = rich_error(caught.value)
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error
        assert error.domain == "webhooks.dembrane.com"
        assert "ListWebhooks" in error.message
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(b"\xff\xff\xff\xff")
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


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


def _serve_env(tmp_path: Path, database: str = "serve.db", **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "WEBHOOKS_DATABASE_URL": f"sqlite:///{tmp_path / database}",
        "WEBHOOKS_GRPC_PORT": str(unused_port()),
        "WEBHOOKS_HTTP_PORT": str(unused_port()),
        "WEBHOOKS_JWT_SECRET": JWT_SECRET,
        **extra,
    }


async def _start_cli(
    env: dict[str, str], *args: str, stderr: int = asyncio.subprocess.PIPE
) -> asyncio.subprocess.Process:
    """``dembrane-webhooks ARGS`` as a child process of the test."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dembrane.webhooks.cli",
        *args,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=stderr,
    )


async def _run_to_exit(env: dict[str, str], *args: str) -> tuple[int, str]:
    process = await _start_cli(env, *args)
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, stderr.decode()


async def test_sigterm_lets_in_flight_calls_finish(tmp_path: Path) -> None:
    """On SIGTERM the process stops taking calls but the call in flight completes, then exits 0."""
    env = _serve_env(tmp_path, WEBHOOKS_ALLOWED_TARGETS="127.0.0.0/8")
    grpc_port = int(env["WEBHOOKS_GRPC_PORT"])
    process = await _start_cli(env, "serve")
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


async def test_sigterm_during_start_up_stops_at_once(tmp_path: Path) -> None:
    """SIGTERM while start-up waits on a database server that takes the connection but never
    answers ends the process at once with status 0, rather than after the connection's
    10 s timeout with a failure."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    silent.setblocking(False)
    port = silent.getsockname()[1]
    env = _serve_env(tmp_path, WEBHOOKS_DATABASE_URL=f"postgresql://u@127.0.0.1:{port}/db")
    process = await _start_cli(env, "serve")
    loop = asyncio.get_running_loop()
    try:
        # The service is migrating once it has connected.
        connection, _ = await asyncio.wait_for(loop.sock_accept(silent), timeout=30)
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
        took = time.monotonic() - signalled
        connection.close()
    finally:
        silent.close()
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0
    assert took < 5
    assert "shutting down before start-up finished" in stderr.decode()


async def test_sigterm_answers_every_call_it_holds_ok_or_unavailable(tmp_path: Path) -> None:
    """Calls the server holds when SIGTERM arrives, some still queued inside gRPC, each get
    their real answer (and are stored) or UNAVAILABLE, never CANCELLED."""
    env = _serve_env(tmp_path, "sigterm.db")
    grpc_port = int(env["WEBHOOKS_GRPC_PORT"])
    process = await _start_cli(env, "serve", "--no-dispatcher", stderr=asyncio.subprocess.DEVNULL)
    try:
        await _wait_for_port(grpc_port)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}")
        directory = directory_service_pb2_grpc.DirectoryServiceStub(channel)
        md = (
            ("authorization", "Bearer " + mint_token(JWT_SECRET, "svc", scopes=[SCOPE_DIRECTORY])),
        )
        await directory.UpsertWorkspace(
            dpb.UpsertWorkspaceRequest(workspace_id="w", tier="changemaker"), metadata=md
        )
        await directory.UpsertProject(
            dpb.UpsertProjectRequest(project_id="p", workspace_id="w"), metadata=md
        )
        events = event_service_pb2_grpc.EventServiceStub(channel)
        publisher = (
            ("authorization", "Bearer " + mint_token(JWT_SECRET, "svc", scopes=[SCOPE_PUBLISH])),
        )
        answered = asyncio.Event()

        async def publish(event_id: str) -> grpc.StatusCode:
            event = event_pb2.Event(
                id=event_id,
                type="report.generated",
                project_id="p",
                report=event_pb2.Report(id="r", status="published", language="en"),
            )
            try:
                await events.PublishEvent(
                    epb.PublishEventRequest(event=event), metadata=publisher, timeout=30
                )
                return grpc.StatusCode.OK
            except grpc.aio.AioRpcError as error:
                return error.code()
            finally:
                answered.set()

        # More calls at once than the server takes up before the signal: gRPC queues the
        # rest, and those are the ones its own shutdown would cancel.
        ids = [f"evt-{index}" for index in range(200)]
        calls = [asyncio.ensure_future(publish(event_id)) for event_id in ids]
        await answered.wait()
        process.send_signal(signal.SIGTERM)
        codes = dict(zip(ids, await asyncio.gather(*calls), strict=True))
        await channel.close()
        assert await asyncio.wait_for(process.wait(), timeout=30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    tally = Counter(code.name for code in codes.values())
    assert set(tally) <= {"OK", "UNAVAILABLE"}, tally
    with sqlite3.connect(tmp_path / "sigterm.db") as database:
        stored = {row[0] for row in database.execute("SELECT id FROM events")}
    acknowledged = {event_id for event_id, code in codes.items() if code == grpc.StatusCode.OK}
    assert acknowledged
    assert acknowledged <= stored


async def test_a_call_arriving_while_the_server_stops_is_unavailable(tmp_path: Path) -> None:
    """While the server stops, a new call is refused with UNAVAILABLE, reason SHUTTING_DOWN
    (which clients retry), over REST too (503), and the call in flight still gets its
    answer."""
    running = Service(make_settings(tmp_path))
    await running.start()
    stopping: asyncio.Future[None] | None = None
    try:
        channel = grpc.aio.insecure_channel(running.grpc_target)
        stubs = Stubs.on(channel)
        health = health_pb2_grpc.HealthStub(channel)
        tokens = Tokens(JWT_SECRET)
        world = await seed_world(stubs, tokens)
        owner = tokens.bearer(tokens.user(world.owner))
        async with Receiver(default=Reply(200, delay=1.0)) as receiver:
            created = await stubs.webhooks.CreateWebhook(
                pb.CreateWebhookRequest(
                    project_id=world.paid_project,
                    name="Slow",
                    url=receiver.url,
                    events=["report.generated"],
                ),
                metadata=owner,
            )
            in_flight = asyncio.ensure_future(
                stubs.webhooks.TestWebhook(
                    pb.TestWebhookRequest(
                        project_id=world.paid_project, webhook_id=created.webhook.id
                    ),
                    metadata=owner,
                )
            )
            await receiver.wait_for(1)
            watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            stopping = asyncio.ensure_future(running.stop())
            # NOT_SERVING is reported in the step that stops taking calls.
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stubs.webhooks.ListWebhooks(
                    pb.ListWebhooksRequest(project_id=world.paid_project), metadata=owner
                )
            error = rich_error(caught.value)
            assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN")
            # The gateway is still up: a REST call gets a 503 that says why, not a closed port.
            async with (
                aiohttp.ClientSession() as http,
                http.get(
                    f"{running.http_url}/api/projects/{world.paid_project}/webhooks",
                    headers={"Authorization": owner[0][1]},
                ) as reply,
            ):
                assert reply.status == 503
                assert (await reply.json())["reason"] == "SHUTTING_DOWN"
            assert (await in_flight).success
        await channel.close()
    finally:
        await (stopping if stopping is not None else running.stop())


@pytest.mark.sqlite_only
async def test_a_second_process_delivering_from_one_sqlite_file_is_refused(
    tmp_path: Path,
) -> None:
    """On SQLite a dispatcher takes over every lease at start, so a second process that
    would deliver from the same file is refused in one line, while the first keeps going."""
    env = _serve_env(tmp_path)
    first = await _start_cli(env, "serve", stderr=asyncio.subprocess.DEVNULL)
    try:
        await _wait_for_port(int(env["WEBHOOKS_GRPC_PORT"]))
        code, stderr = await _run_to_exit(_serve_env(tmp_path), "worker")
        assert code == 1
        assert "Another process already delivers from" in stderr
        assert "Traceback" not in stderr
        assert first.returncode is None
    finally:
        first.terminate()
        assert await asyncio.wait_for(first.wait(), timeout=20) == 0


_REST_TAKEN = "Cannot listen for REST on 127.0.0.1:{port}: the port is taken."


@pytest.mark.parametrize(
    ("command", "variable", "sentence"),
    [
        ("serve", "WEBHOOKS_GRPC_PORT", "Cannot listen for gRPC on 127.0.0.1:{port}"),
        ("serve", "WEBHOOKS_HTTP_PORT", _REST_TAKEN),
        ("gateway", "WEBHOOKS_HTTP_PORT", _REST_TAKEN),
        (
            "gateway",
            "WEBHOOKS_METRICS_PORT",
            "Cannot listen for metrics on 127.0.0.1:{port} (WEBHOOKS_METRICS_PORT): "
            "the port is taken.",
        ),
    ],
    ids=["grpc", "rest", "gateway-rest", "gateway-metrics"],
)
async def test_a_taken_port_stops_start_up_in_one_line(
    tmp_path: Path, command: str, variable: str, sentence: str
) -> None:
    """A port in use ends start-up (of `serve`, or of the standalone `gateway`) with exit
    status 1 and a sentence naming it, before the dispatcher starts, with no traceback, no
    log line of gRPC's own, and nothing left running (no 'Task was destroyed' from the
    sender processes)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ("gateway", "--grpc-target", "127.0.0.1:1") if command == "gateway" else (command,)
        code, stderr = await _run_to_exit(_serve_env(tmp_path, **{variable: str(port)}), *args)
    assert code == 1
    (last,) = [line for line in stderr.splitlines() if line.startswith("dembrane-webhooks: ")]
    assert sentence.format(port=port) in last
    for unwanted in ("Traceback", "add_port", "destroyed", "dispatcher started"):
        assert unwanted not in stderr


async def test_the_standalone_gateway_serves_metrics_on_their_own_port(tmp_path: Path) -> None:
    """`gateway` with WEBHOOKS_METRICS_PORT serves /metrics there, as `serve` does, besides
    the REST port's own /metrics."""
    metrics_port = unused_port()
    env = _serve_env(tmp_path, WEBHOOKS_METRICS_PORT=str(metrics_port))
    process = await _start_cli(env, "gateway", "--grpc-target", "127.0.0.1:1")
    try:
        await _wait_for_port(int(env["WEBHOOKS_HTTP_PORT"]))
        values = await _metric_values(f"http://127.0.0.1:{metrics_port}/metrics")
        assert "webhooks_deliveries_in_flight{}" in values
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=20)
    assert process.returncode == 0, stderr.decode()
    assert f"metrics on http://127.0.0.1:{metrics_port}/metrics" in stderr.decode()


async def test_a_standalone_gateway_stopping_with_a_delay_fails_its_health_first(
    tmp_path: Path,
) -> None:
    """`gateway` given WEBHOOKS_SHUTDOWN_DELAY answers /healthz 503 from SIGTERM on, while its
    port stays open for that long, and then exits cleanly."""
    delay = 3.0
    env = _serve_env(tmp_path, WEBHOOKS_SHUTDOWN_DELAY=str(delay))
    process = await _start_cli(env, "gateway", "--grpc-target", "127.0.0.1:1")
    port = int(env["WEBHOOKS_HTTP_PORT"])
    try:
        await _wait_for_port(port)
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        async with aiohttp.ClientSession() as http:
            for _ in range(100):
                async with http.get(f"http://127.0.0.1:{port}/healthz") as answer:
                    body = await answer.json()
                if body.get("detail") == "The gateway is shutting down.":
                    break
                await asyncio.sleep(0.02)
            assert answer.status == 503
            assert body == {"status": "unavailable", "detail": "The gateway is shutting down."}
        assert time.monotonic() - signalled < delay
    finally:
        with contextlib.suppress(ProcessLookupError):  # signalled once already above
            process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=20)
    assert process.returncode == 0, stderr.decode()
    assert time.monotonic() - signalled >= delay


async def test_the_standalone_gateway_warns_of_risky_settings(tmp_path: Path) -> None:
    """`gateway` warns of a misspelt WEBHOOKS_ variable and of a short JWT secret (it checks
    tokens with it), as `serve` does."""
    env = _serve_env(tmp_path, WEBHOOKS_JWT_SECRET="short", WEBHOOKS_HTTP_PROT="1")
    process = await _start_cli(env, "gateway", "--grpc-target", "127.0.0.1:1")
    try:
        await _wait_for_port(int(env["WEBHOOKS_HTTP_PORT"]))
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=20)
    log = stderr.decode()
    assert process.returncode == 0, log
    assert "WEBHOOKS_HTTP_PROT" in log
    assert "WEBHOOKS_JWT_SECRET" in log


async def test_an_address_not_of_this_machine_stops_start_up_in_one_line(
    tmp_path: Path,
) -> None:
    """A bind address no interface has (TEST-NET-1) ends start-up with one sentence that says
    so, and no log line of gRPC's own."""
    code, stderr = await _run_to_exit(
        _serve_env(tmp_path, WEBHOOKS_BIND="192.0.2.1", WEBHOOKS_GRPC_PORT="0"), "serve"
    )
    assert code == 1
    assert (
        "dembrane-webhooks: Cannot listen for gRPC on 192.0.2.1:0: "
        "the address is not one of this machine's." in stderr
    )
    assert "add_port" not in stderr
    assert "Traceback" not in stderr


async def test_token_refuses_an_empty_user_or_a_lifetime_not_positive(tmp_path: Path) -> None:
    """`token` with an empty --sub or a --ttl of zero or less mints nothing (exit status 2)."""
    for args in (("--sub", " "), ("--sub", "u1", "--ttl", "-5")):
        code, stderr = await _run_to_exit(_serve_env(tmp_path), "token", *args)
        assert code == 2
        assert stderr.strip() == (
            "dembrane-webhooks: --sub must name a user and --ttl be positive."
        )


def _store_down(*_args: object, **_kwargs: object) -> NoReturn:
    """What the store's calls raise while its server is down."""
    raise OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))


async def test_calls_while_the_store_is_down_are_unavailable(
    service: Service,
    stubs: Stubs,
    tokens: Tokens,
    world: World,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the store unreachable a publish gets UNAVAILABLE (which clients retry) with
    reason STORE_UNAVAILABLE, not INTERNAL, and works again once the store is back."""
    assert service.resources is not None
    event = event_pb2.Event(
        type="conversation.started",
        project_id=world.paid_project,
        conversation=event_pb2.Conversation(id="c1"),
    )
    request = epb.PublishEventRequest(event=event)
    metadata = tokens.bearer(tokens.service(SCOPE_PUBLISH))
    monkeypatch.setattr(service.resources.database, "call_driver", _store_down)
    monkeypatch.setattr(service.resources.database, "run_driver", _store_down)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stubs.events.PublishEvent(request, metadata=metadata)
    error = rich_error(caught.value)
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert error.reason == "STORE_UNAVAILABLE"
    monkeypatch.undo()
    await stubs.events.PublishEvent(request, metadata=metadata)


async def test_health_follows_the_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Health checks answer NOT_SERVING while the store cannot be reached and SERVING again
    once it answers, so orchestrators and clients can tell."""
    monkeypatch.setattr(server_module, "STORE_CHECK_SECONDS", 0.05)
    running = Service(make_settings(tmp_path))
    await running.start()
    try:
        assert running.resources is not None
        database = running.resources.database
        channel = grpc.aio.insecure_channel(running.grpc_target)
        health = health_pb2_grpc.HealthStub(channel)

        async def status() -> int:
            answer = await health.Check(health_pb2.HealthCheckRequest(service=""))
            return int(answer.status)

        async def becomes(wanted: int) -> None:
            for _ in range(200):
                if await status() == wanted:
                    return
                await asyncio.sleep(0.02)
            raise AssertionError(f"health never became {wanted}")

        with monkeypatch.context() as patch:
            patch.setattr(database, "run_relaxed", _store_down)
            await becomes(health_pb2.HealthCheckResponse.NOT_SERVING)
        await becomes(health_pb2.HealthCheckResponse.SERVING)
        await channel.close()
    finally:
        await running.stop()


async def test_a_shutdown_delay_reports_not_serving_while_calls_are_still_taken(
    tmp_path: Path,
) -> None:
    """With WEBHOOKS_SHUTDOWN_DELAY, a stopping service first reports NOT_SERVING on gRPC
    health and both /healthz for that long while it still stores published events, and
    stops only once the delay has passed."""
    delay = 3.0
    running = Service(make_settings(tmp_path, shutdown_delay=delay, metrics_port=unused_port()))
    await running.start()
    tokens = Tokens(JWT_SECRET)
    stopping: asyncio.Task[None] | None = None
    try:
        async with grpc.aio.insecure_channel(running.grpc_target) as channel:
            stubs = Stubs.on(channel)
            world = await seed_world(stubs, tokens)
            metadata = tokens.bearer(tokens.service(SCOPE_PUBLISH))
            began = time.monotonic()
            stopping = asyncio.create_task(running.stop())
            await _health_becomes(running, health_pb2.HealthCheckResponse.NOT_SERVING)
            async with aiohttp.ClientSession() as http:
                for url in (
                    f"{running.http_url}/healthz",
                    f"http://127.0.0.1:{running.settings.metrics_port}/healthz",
                ):
                    async with http.get(url) as health:
                        assert health.status == 503, url
            published = await stubs.events.PublishEvent(
                _publish_request(world, "evt-during-delay"), metadata=metadata
            )
            assert published.result.event_id == "evt-during-delay"
            assert not published.result.duplicate
            assert time.monotonic() - began < delay
            assert not stopping.done()
            await asyncio.wait_for(asyncio.shield(stopping), timeout=delay + 15)
            assert time.monotonic() - began >= delay
    finally:
        if stopping is None:
            await running.stop()
        else:
            await stopping


async def _health_becomes(service: Service, wanted: int) -> None:
    async with grpc.aio.insecure_channel(service.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(300):
            answer = await health.Check(health_pb2.HealthCheckRequest(service=""))
            if answer.status == wanted:
                return
            await asyncio.sleep(0.02)
    raise AssertionError(f"health never became {wanted}")


def _publish_request(world: World, event_id: str) -> epb.PublishEventRequest:
    return epb.PublishEventRequest(
        event=event_pb2.Event(
            id=event_id,
            type="conversation.started",
            project_id=world.paid_project,
            conversation=event_pb2.Conversation(id="c1"),
        )
    )


async def _refuses_for_want_of_store(stubs: Stubs, tokens: Tokens, world: World) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stubs.events.PublishEvent(
            _publish_request(world, "evt-refused"),
            metadata=tokens.bearer(tokens.service(SCOPE_PUBLISH)),
        )
    error = rich_error(caught.value)
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE")


async def test_a_store_that_takes_no_writes_is_unavailable_and_unhealthy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A store that still answers reads but refuses writes (a read-only SQLite file, a
    PostgreSQL server turned read-only or a standby) makes publishing UNAVAILABLE, not
    INTERNAL with a traceback, and health NOT_SERVING until it takes writes again."""
    async with _watched_service(tmp_path, monkeypatch) as (service, stubs, tokens, world):
        await _refused_while_read_only(service, stubs, tokens, world)
    assert "Traceback" not in caplog.text
    assert "unexpected failure" not in caplog.text


@contextlib.asynccontextmanager
async def _watched_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Service, Stubs, Tokens, World]]:
    """A service whose health watch looks at the store every 50 ms, with a seeded world."""
    monkeypatch.setattr(server_module, "STORE_CHECK_SECONDS", 0.05)
    service = Service(make_settings(tmp_path))
    await service.start()
    try:
        async with grpc.aio.insecure_channel(service.grpc_target) as channel:
            stubs, tokens = Stubs.on(channel), Tokens(JWT_SECRET)
            yield service, stubs, tokens, await seed_world(stubs, tokens)
    finally:
        await service.stop()


async def _refused_while_read_only(
    service: Service, stubs: Stubs, tokens: Tokens, world: World
) -> None:
    assert service.resources is not None
    database = service.resources.database
    admin_url = os.environ.get("WEBHOOKS_TEST_POSTGRES_URL", "")

    async def read_only(on: bool) -> None:
        if database.is_sqlite:
            await database.run(
                lambda session: session.connection().exec_driver_sql(
                    f"PRAGMA query_only={'ON' if on else 'OFF'}"
                )
            )
            return
        name = database.engine.url.database
        change = "SET default_transaction_read_only = on" if on else "RESET ALL"
        with psycopg.connect(admin_url, autocommit=True) as connection:
            connection.execute(f'ALTER DATABASE "{name}" {change}')
        database.engine.dispose()  # connections made from now on see the setting

    await read_only(True)
    try:
        await _health_becomes(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        # What /healthz on the metrics port says too.
        assert service.problem() == "The store is unavailable."
        await _refuses_for_want_of_store(stubs, tokens, world)
    finally:
        await read_only(False)
    await _health_becomes(service, health_pb2.HealthCheckResponse.SERVING)
    await stubs.events.PublishEvent(
        _publish_request(world, "evt-after"), metadata=tokens.bearer(tokens.service(SCOPE_PUBLISH))
    )


@pytest.mark.sqlite_only
async def test_a_sqlite_file_removed_under_the_service_stops_it_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """When the SQLite file is removed while the service runs, publishing is refused as
    UNAVAILABLE (from the next look at the file, a fifth of a second at most) and health
    turns NOT_SERVING, instead of acknowledging events written into the removed file, which
    are lost with it; the log says what happened."""
    async with _watched_service(tmp_path, monkeypatch) as (service, stubs, tokens, world):
        assert service.resources is not None
        path = Path(service.resources.database.engine.url.database or "")
        await stubs.events.PublishEvent(
            _publish_request(world, "evt-before"),
            metadata=tokens.bearer(tokens.service(SCOPE_PUBLISH)),
        )
        for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            name.unlink(missing_ok=True)
        await asyncio.sleep(FILE_CHECK_SECONDS + 0.05)
        await _refuses_for_want_of_store(stubs, tokens, world)
        await _health_becomes(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    assert f"the SQLite file {path} was removed or replaced while the service ran" in caplog.text
    assert "Traceback" not in caplog.text


async def _metric_values(url: str) -> dict[str, float]:
    """Each sample of the Prometheus text at ``url``, keyed by name and labels."""
    async with aiohttp.ClientSession() as http, http.get(url) as reply:
        assert reply.status == 200
        assert reply.content_type == "text/plain"
        text = await reply.text()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}"] = sample.value
    return values


async def test_metrics_count_what_was_published_and_sent(
    service: Service, stubs: Stubs, tokens: Tokens, world: World
) -> None:
    """GET /metrics counts stored events, queued deliveries, attempts and their outcomes
    (a paused webhook's skipped rows included), with no project, webhook or event id in any
    label."""
    url = f"{service.http_url}/metrics"
    before = await _metric_values(url)
    async with Receiver("s3cret-s3cret", replies=[500]) as receiver:
        admin = tokens.bearer(tokens.user(world.admin))
        created = [
            await stubs.webhooks.CreateWebhook(
                pb.CreateWebhookRequest(
                    project_id=world.paid_project,
                    name=name,
                    url=receiver.url,
                    events=["conversation.started"],
                    secret="s3cret-s3cret",
                ),
                metadata=admin,
            )
            for name in ("Hook", "Paused")
        ]
        await stubs.webhooks.UpdateWebhook(
            pb.UpdateWebhookRequest(
                project_id=world.paid_project,
                webhook_id=created[1].webhook.id,
                status=webhook_pb2.WEBHOOK_STATUS_DRAFT,
            ),
            metadata=admin,
        )
        events = [
            event_pb2.Event(
                id=f"evt-metrics-{i}",
                type="conversation.started",
                project_id=world.paid_project,
                conversation=event_pb2.Conversation(id="c1"),
            )
            for i in range(3)
        ]
        await stubs.events.PublishEvents(
            epb.PublishEventsRequest(events=events),
            metadata=tokens.bearer(tokens.service(SCOPE_PUBLISH)),
        )
        await receiver.wait_for(4)  # one failure, retried at once, then three successes
        succeeded = "webhooks_deliveries_finished_total{status=succeeded}"
        for _ in range(200):
            after = await _metric_values(url)
            if after.get(succeeded, 0) - before.get(succeeded, 0) >= 3:
                break
            await asyncio.sleep(0.02)

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("webhooks_events_published_total{}") == 3
    assert delta("webhooks_deliveries_queued_total{}") == 3
    assert delta("webhooks_delivery_attempts_total{result=success}") == 3
    assert delta("webhooks_delivery_attempts_total{result=failure}") == 1
    assert delta(succeeded) == 3
    assert delta("webhooks_deliveries_finished_total{status=skipped}") == 3
    assert delta("webhooks_delivery_attempt_seconds_count{}") == 4
    assert after["webhooks_deliveries_in_flight{}"] == 0
    assert not any("evt-metrics" in key or world.paid_project in key for key in after)


async def _get_json(url: str) -> tuple[int, object]:
    async with aiohttp.ClientSession() as http, http.get(url) as reply:
        if reply.content_type != "application/json":
            return reply.status, await reply.text()
        return reply.status, await reply.json()


async def test_metrics_can_have_a_port_of_their_own(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """WEBHOOKS_METRICS_PORT serves /metrics apart from the gateway (a worker has none) and
    /healthz, the worker's probe, as the log says; any other path is 404, so a probe
    pointed at a wrong path fails."""
    caplog.set_level("INFO", logger="dembrane.webhooks.service")
    port = unused_port()
    running = Service(make_settings(tmp_path, metrics_port=port), Parts(grpc=False, gateway=False))
    await running.start()
    try:
        values = await _metric_values(f"http://127.0.0.1:{port}/metrics")
        assert "webhooks_deliveries_in_flight{}" in values
        assert await _get_json(f"http://127.0.0.1:{port}/healthz") == (200, {"status": "ok"})
        status, text = await _get_json(f"http://127.0.0.1:{port}/health")
        assert (status, text) == (404, "Not found; this port serves /metrics and /healthz.\n")
        base = f"http://127.0.0.1:{port}"
        assert f"metrics on {base}/metrics, health on {base}/healthz" in caplog.text
    finally:
        await running.stop()


def test_a_process_is_unhealthy_until_started(tmp_path: Path) -> None:
    """Health probes hear "starting" before every part runs, so an orchestrator sends no
    work to a process that cannot take it yet."""
    service = Service(make_settings(tmp_path), Parts(grpc=False, gateway=False))
    assert service.problem() == "The service is starting."


async def test_a_stopping_worker_reports_it_on_its_health_port(tmp_path: Path) -> None:
    """From the moment stopping begins, the worker's /healthz answers 503 "shutting down",
    while its dispatcher still finishes what it holds."""
    port = unused_port()
    running = Service(make_settings(tmp_path, metrics_port=port), Parts(grpc=False, gateway=False))
    await running.start()
    assert running.problem() is None
    assert running.dispatcher is not None
    finishing = asyncio.Event()
    real_stop = running.dispatcher.stop

    async def slow_stop() -> None:
        finishing.set()
        await asyncio.sleep(0.3)
        await real_stop()

    running.dispatcher.stop = slow_stop  # type: ignore[method-assign]
    stopping = asyncio.create_task(running.stop())
    await finishing.wait()
    status, body = await _get_json(f"http://127.0.0.1:{port}/healthz")
    await stopping
    assert (status, body) == (
        503,
        {"status": "unavailable", "detail": "The service is shutting down."},
    )


@pytest.mark.sqlite_only
async def test_a_worker_without_its_store_is_unhealthy(tmp_path: Path) -> None:
    """A worker whose store is gone answers /healthz with 503 and says why, once its
    dispatcher next looks at the store: an orchestrator can restart or page on it."""
    port = unused_port()
    settings = make_settings(tmp_path, metrics_port=port)
    running = Service(settings, Parts(grpc=False, gateway=False))
    await running.start()
    try:
        assert running.resources is not None
        path = Path(running.resources.database.engine.url.database or "")
        for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            name.unlink(missing_ok=True)
        await asyncio.sleep(FILE_CHECK_SECONDS + 0.05)
        running.resources.wake_dispatcher()
        url = f"http://127.0.0.1:{port}/healthz"
        for _ in range(100):
            status, body = await _get_json(url)
            if status != 200:
                break
            await asyncio.sleep(0.05)
        assert (status, body) == (
            503,
            {
                "status": "unavailable",
                "detail": "The store is unavailable; deliveries wait until it is back.",
            },
        )
    finally:
        await running.stop()


async def test_an_ipv6_bind_address_serves_grpc_and_rest(tmp_path: Path) -> None:
    """With WEBHOOKS_BIND=::1 the gateway reaches its gRPC server (the address bracketed in
    the target), so /healthz and a REST call answer rather than 503."""
    service = Service(make_settings(tmp_path, bind="::1"))
    await service.start()
    try:
        assert service.grpc_target.startswith("[::1]:")
        assert service.http_url.startswith("http://[::1]:")
        tokens = Tokens(JWT_SECRET)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{service.http_url}/healthz") as reply:
                assert reply.status == 200
            async with http.get(
                f"{service.http_url}/api/projects/p-unknown/webhooks",
                headers={"Authorization": f"Bearer {tokens.user('u1')}"},
            ) as reply:
                assert reply.status == 404
    finally:
        await service.stop()


async def test_the_database_in_use_is_logged_with_its_full_path(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative SQLite path is resolved from the working directory, and the start-up log
    names the file it opened by its full path, so a start from another folder shows."""
    monkeypatch.chdir(tmp_path)
    settings = make_settings(tmp_path, database_url="sqlite:///var/relative.db")
    caplog.set_level("INFO", logger="dembrane.webhooks.service")
    service = Service(settings, Parts(grpc=False, gateway=False, dispatcher=False))
    await service.start()
    await service.stop()
    assert f"database: SQLite file {tmp_path / 'var' / 'relative.db'}" in caplog.text


async def test_a_database_path_that_cannot_be_made_stops_start_up_naming_the_setting(
    tmp_path: Path,
) -> None:
    """A SQLite path under a plain file ends start-up with one line naming
    WEBHOOKS_DATABASE_URL and the path at fault, and exit status 1."""
    (tmp_path / "afile").write_text("")
    for command in ("serve", "migrate"):
        code, stderr = await _run_to_exit(_serve_env(tmp_path, database="afile/sub/x.db"), command)
        assert code == 1
        assert "cannot use the SQLite database WEBHOOKS_DATABASE_URL names" in stderr
        assert "afile" in stderr
        assert "Traceback" not in stderr


async def test_only_the_ports_a_command_listens_on_must_differ(tmp_path: Path) -> None:
    """The same port for REST and metrics stops serve (both listen) with one line and status
    2, while migrate (which listens on neither) runs."""
    env = _serve_env(tmp_path)
    env["WEBHOOKS_METRICS_PORT"] = env["WEBHOOKS_HTTP_PORT"]
    code, stderr = await _run_to_exit(env, "serve")
    assert code == 2
    assert stderr.strip().endswith(
        "WEBHOOKS_HTTP_PORT and WEBHOOKS_METRICS_PORT must differ; "
        f"both are {env['WEBHOOKS_HTTP_PORT']}."
    )
    code, stderr = await _run_to_exit(env, "migrate")
    assert code == 0, stderr


@pytest.mark.parametrize(
    "target", ["nonsense", "127.0.0.1:99999", ":50051", "host:", "http://127.0.0.1:50051"]
)
async def test_gateway_refuses_a_grpc_target_that_is_no_host_and_port(
    tmp_path: Path, target: str
) -> None:
    """`gateway --grpc-target` must be HOST:PORT: otherwise one line and exit status 2,
    rather than a gateway that answers 503 to everything."""
    code, stderr = await _run_to_exit(_serve_env(tmp_path), "gateway", "--grpc-target", target)
    assert code == 2
    assert stderr.strip() == (
        f"dembrane-webhooks: --grpc-target must be HOST:PORT, such as 127.0.0.1:50051, "
        f"not {target!r}."
    )


async def test_migrate_warns_of_a_misspelt_variable(tmp_path: Path) -> None:
    """`migrate` warns of a WEBHOOKS_ variable no setting reads, as `serve` does."""
    env = _serve_env(tmp_path, WEBHOOKS_DATABSE_URL="sqlite:///elsewhere.db")
    code, stderr = await _run_to_exit(env, "migrate")
    assert code == 0, stderr
    assert "WEBHOOKS_DATABSE_URL" in stderr
    assert "WARNING" in stderr


async def test_debug_logging_leaves_out_grpcs_line_per_call(tmp_path: Path) -> None:
    """At WEBHOOKS_LOG_LEVEL=DEBUG, REST calls (each a gRPC call inside) add no line of
    gRPC's asyncio layer to the log, while the service's own lines remain."""
    env = _serve_env(tmp_path, WEBHOOKS_LOG_LEVEL="DEBUG")
    process = await _start_cli(env, "serve")
    try:
        await _wait_for_port(int(env["WEBHOOKS_HTTP_PORT"]))
        url = f"http://127.0.0.1:{env['WEBHOOKS_HTTP_PORT']}/api/projects/p/webhooks"
        async with aiohttp.ClientSession() as http:
            for _ in range(3):
                async with http.get(url, headers={"Authorization": "Bearer x"}) as reply:
                    assert reply.status == 401
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=20)
    log = stderr.decode()
    assert "gRPC listening on" in log
    assert "grpc._cython" not in log


async def test_a_taken_metrics_port_names_its_setting(tmp_path: Path) -> None:
    """A metrics port in use stops start-up with a sentence naming WEBHOOKS_METRICS_PORT."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        service = Service(make_settings(tmp_path, metrics_port=port))
        with pytest.raises(StartupError) as caught:
            await service.start()
    assert str(caught.value).startswith(
        f"Cannot listen for metrics on 127.0.0.1:{port} (WEBHOOKS_METRICS_PORT): "
    )


@pytest.mark.sqlite_only
async def test_a_postgresql_server_that_never_answers_stops_start_up(tmp_path: Path) -> None:
    """A PostgreSQL address that accepts connections but never answers (a black-holed or
    frozen host) ends start-up after libpq's connect timeout with one line naming the
    setting, instead of hanging for good."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # never answers, never closes

    silent = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    env = {**_serve_env(tmp_path), "WEBHOOKS_DATABASE_URL": f"postgresql://u:p@127.0.0.1:{port}/db"}
    try:
        code, stderr = await _run_to_exit(env, "serve")
    finally:
        for writer in held:
            writer.close()
        silent.close()
    assert code == 1
    assert stderr.splitlines()[-1] == (
        "dembrane-webhooks: cannot use the database WEBHOOKS_DATABASE_URL names: "
        "connection timeout expired"
    )


async def test_a_database_sqlite_cannot_open_names_the_setting(tmp_path: Path) -> None:
    """A SQLite URL naming a directory ends start-up with one line naming
    WEBHOOKS_DATABASE_URL and no traceback."""
    (tmp_path / "adir").mkdir()
    env = {**_serve_env(tmp_path), "WEBHOOKS_DATABASE_URL": f"sqlite:///{tmp_path / 'adir'}"}
    code, stderr = await _run_to_exit(env, "serve")
    assert code == 1
    assert "dembrane-webhooks: cannot use the database WEBHOOKS_DATABASE_URL names: " in stderr
    assert "Traceback" not in stderr


async def test_health_list_reports_every_service(stubs: Stubs) -> None:
    """grpc.health.v1.Health/List, which reflection shows, answers with every service name
    and its status rather than UNIMPLEMENTED."""
    health = health_pb2_grpc.HealthStub(stubs.channel)
    listed = await health.List(health_pb2.HealthListRequest())
    serving = health_pb2.HealthCheckResponse.SERVING
    assert listed.statuses[""].status == serving
    for name in (
        "dembrane.webhooks.v1.EventService",
        "dembrane.webhooks.v1.WebhookService",
        "dembrane.webhooks.v1.DirectoryService",
    ):
        assert listed.statuses[name].status == serving


async def test_reflection_finds_the_file_of_a_methods_full_name(stubs: Stubs) -> None:
    """file_containing_symbol takes package.Service.Method too (grpcurl describe asks so),
    on v1 as on v1alpha; an unknown method is still not found."""
    for symbol, found in (
        ("dembrane.webhooks.v1.WebhookService.UpdateWebhook", True),
        ("dembrane.webhooks.v1.WebhookService.NoSuchMethod", False),
    ):
        (answer,) = await _reflect_v1(
            stubs.channel, [reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)]
        )
        if found:
            protos = answer.file_descriptor_response.file_descriptor_proto
            assert protos, symbol
        else:
            assert answer.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


@pytest.mark.sqlite_only
async def test_idle_clients_may_send_keepalive_pings_every_ten_seconds(tmp_path: Path) -> None:
    """A client that keeps an idle connection alive with a ping every 10 s (the shortest Go's
    gRPC allows) keeps it: the server does not answer the third such ping with GOAWAY
    "too_many_pings", which would drop the connection of every idle backend."""
    service = Service(make_settings(tmp_path), Parts(grpc=True, gateway=False, dispatcher=False))
    await service.start()
    options = [
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    try:
        async with grpc.aio.insecure_channel(service.grpc_target, options=options) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            await health.Check(health_pb2.HealthCheckRequest())
            assert channel.get_state() == grpc.ChannelConnectivity.READY
            # Three pings (at 10, 20 and 30 s) with no call between them.
            await asyncio.sleep(34)
            assert channel.get_state() == grpc.ChannelConnectivity.READY
    finally:
        await service.stop()


async def test_an_outcome_journal_is_one_process_s_alone(tmp_path: Path) -> None:
    """A dispatcher keeps its outcomes in the journal WEBHOOKS_OUTCOME_JOURNAL names (how a
    replica on PostgreSQL gets one); a second process given the same path is refused at
    start with a sentence saying why, and may have it once the first has stopped."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    journal = str(tmp_path / "outcomes")
    first = Service(make_settings(tmp_path / "a", outcome_journal=journal))
    await first.start()
    try:
        assert first.dispatcher is not None
        assert first.dispatcher._journal_prefix == journal
        second = Service(make_settings(tmp_path / "b", outcome_journal=journal))
        with pytest.raises(StartupError) as caught:
            await second.start()
        await second.stop()
        assert str(caught.value) == (
            f"Another process already keeps its outcome journal at {journal}: give each "
            "process a WEBHOOKS_OUTCOME_JOURNAL of its own."
        )
    finally:
        await first.stop()
    third = Service(make_settings(tmp_path / "b", outcome_journal=journal))
    await third.start()
    await third.stop()
