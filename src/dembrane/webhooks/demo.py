"""``dembrane-webhooks demo``: the whole path of an event, on this machine, in seconds.

The demo starts a complete service (gRPC, the REST gateway and the dispatcher) on free
loopback ports with a throwaway SQLite file, and a receiver that checks every signature the
way a customer's would. It then does what the platform does: the backend feeds the
directory, an admin registers a webhook over REST, the backend publishes one event of each
type, and the receiver refuses its first request once, so the retry shows in the delivery
log. Nothing is read from the environment and nothing outlives the command but its output.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import shutil
import signal
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import grpc
from aiohttp import web
from google.protobuf.timestamp_pb2 import Timestamp

from dembrane.webhooks.auth import SCOPE_DIRECTORY, SCOPE_PUBLISH, mint_token
from dembrane.webhooks.config import Settings
from dembrane.webhooks.domain.webhooks import decoded_standard_key
from dembrane.webhooks.service import Service
from dembrane.webhooks.v1 import (
    directory_service_pb2,
    directory_service_pb2_grpc,
    event_pb2,
    event_service_pb2,
    event_service_pb2_grpc,
)

__all__ = ["run_demo"]

_WORKSPACE = "ws-demo"
_PROJECT = "p-demo"
_ADMIN = "u-demo-admin"
_HOOK_PATH = "/hooks/dembrane"
#: The event whose first request the receiver refuses, so that a retry shows.
_REFUSED_TYPE = "conversation.transcribed"
#: How long the demo waits for every delivery to succeed.
_DEADLINE_SECONDS = 30.0


@dataclass
class _Request:
    """One request the receiver got, and what it made of it."""

    event_type: str
    event_id: str
    body_signature_ok: bool
    standard_signature_ok: bool
    answered: int
    headers: dict[str, str]
    body: bytes


class _Receiver:
    """A customer's endpoint: verifies both signatures, answers 503 once, then 200."""

    def __init__(self) -> None:
        self.secret = ""
        self.requests: list[_Request] = []
        self.changed = asyncio.Event()
        self._refused = False
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post(_HOOK_PATH, self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}{_HOOK_PATH}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = dict(request.headers)
        event_type = headers.get("X-Dembrane-Event", "")
        answer = 200
        if event_type == _REFUSED_TYPE and not self._refused:
            self._refused = True
            answer = 503
        self.requests.append(
            _Request(
                event_type=event_type,
                event_id=headers.get("webhook-id", ""),
                body_signature_ok=self._body_signature_ok(headers, body),
                standard_signature_ok=self._standard_signature_ok(headers, body),
                answered=answer,
                headers=headers,
                body=body,
            )
        )
        self.changed.set()
        if answer == 503:
            return web.Response(status=503, text="Busy deploying; try again.")
        return web.Response(status=200, text="ok")

    def _body_signature_ok(self, headers: dict[str, str], body: bytes) -> bool:
        digest = hmac.new(self.secret.encode(), body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(f"sha256={digest}", headers.get("X-Dembrane-Signature", ""))

    def _standard_signature_ok(self, headers: dict[str, str], body: bytes) -> bool:
        """Standard Webhooks, as its libraries check it: the key, a fresh timestamp, and one
        matching ``v1,`` signature among those given."""
        key = decoded_standard_key(self.secret) or self.secret.encode()
        stamp = headers.get("webhook-timestamp", "")
        if not stamp.isdigit() or abs(time.time() - int(stamp)) > 300:
            return False
        signed = f"{headers.get('webhook-id', '')}.{stamp}.".encode() + body
        expected = "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
        given = headers.get("webhook-signature", "").split()
        return any(hmac.compare_digest(expected, one) for one in given)

    def answered_ok(self) -> set[str]:
        """The event ids the receiver has accepted."""
        return {r.event_id for r in self.requests if 200 <= r.answered < 300}


def _timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def _events(now: datetime) -> list[event_pb2.Event]:
    """One event of each type, as the platform's backend would publish them."""
    started = now - timedelta(minutes=14)
    conversation: dict[str, Any] = {
        "id": "conv-demo-1",
        "created_at": _timestamp(started),
        "updated_at": _timestamp(now),
        "participant_name": "Table 4",
        "source": "PORTAL_AUDIO",
        "tags": ["mobility", "green spaces"],
    }
    finished = {
        **conversation,
        "duration": 842.5,
        "is_finished": True,
        "is_all_chunks_transcribed": True,
        "transcript": "We would like more cycle lanes near the school, and trees on the square.",
    }
    summary = "Participants asked for safer cycling routes and more greenery downtown."

    def about_the_conversation(step: str, when: datetime, **fields: Any) -> event_pb2.Event:
        return event_pb2.Event(
            id=f"demo-conv-1-{step}",
            type=f"conversation.{step}",
            project_id=_PROJECT,
            occur_time=_timestamp(when),
            conversation=event_pb2.Conversation(**fields),
        )

    return [
        about_the_conversation("started", started, **conversation),
        about_the_conversation("transcribed", now, **finished),
        about_the_conversation("summarized", now, **finished, summary=summary),
        event_pb2.Event(
            id="demo-report-1-generated",
            type="report.generated",
            project_id=_PROJECT,
            occur_time=_timestamp(now),
            report=event_pb2.Report(
                id="report-demo-1", status="published", language="en", date_created=_timestamp(now)
            ),
        ),
    ]


def _settings(folder: Path, jwt_secret: str) -> Settings:
    return Settings(
        grpc_port=0,
        http_port=0,
        bind="127.0.0.1",
        database_url=f"sqlite:///{folder / 'demo.db'}",
        jwt_secret=jwt_secret,
        # The receiver is on this machine; a deployment leaves loopback closed.
        allowed_targets=(ipaddress.ip_network("127.0.0.0/8"),),
        # One second before the retry, so that it shows at once.
        retry_schedule=(1.0, 5.0, 30.0),
        retry_jitter=0.0,
        connect_timeout=2.0,
        request_timeout=5.0,
        sender_processes=0,
        log_level="WARNING",
    )


class _Narrator:
    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._step = 0

    def step(self, text: str) -> None:
        self._step += 1
        self._out.write(f"\n{self._step}. {text}\n")
        self._out.flush()

    def line(self, text: str = "") -> None:
        self._out.write(f"   {text}\n" if text else "\n")
        self._out.flush()


def _bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def _masked(secret: str) -> str:
    return f"{secret[:10]}... ({len(secret)} characters; shown only in this answer)"


def _signatures(request: _Request) -> str:
    """What the receiver found of the request's two signatures."""
    if request.body_signature_ok and request.standard_signature_ok:
        return "both signatures valid"
    wrong = [
        name
        for name, ok in (
            ("X-Dembrane-Signature", request.body_signature_ok),
            ("webhook-signature", request.standard_signature_ok),
        )
        if not ok
    ]
    return f"{' and '.join(wrong)} INVALID"


async def _wait_for(receiver: _Receiver, event_ids: set[str], deadline: float) -> bool:
    while not event_ids <= receiver.answered_ok():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        receiver.changed.clear()
        try:
            await asyncio.wait_for(receiver.changed.wait(), remaining)
        except TimeoutError:
            return False
    return True


async def _delivery_log(
    http: aiohttp.ClientSession, base: str, admin: str, webhook_id: str, expected: int
) -> list[dict[str, Any]]:
    """The webhook's deliveries over REST, each with its latest attempts, once every one has
    succeeded (an outcome is written a moment after the receiver answers)."""
    url = f"{base}/api/projects/{_PROJECT}/webhooks/{webhook_id}/deliveries"
    deadline = time.monotonic() + 10.0
    while True:
        async with http.get(url, headers={"Authorization": f"Bearer {admin}"}) as response:
            deliveries: list[dict[str, Any]] = await response.json()
        done = [d for d in deliveries if d.get("status") == "succeeded"]
        if len(done) >= expected or time.monotonic() > deadline:
            return deliveries
        await asyncio.sleep(0.1)


async def _tour(
    say: _Narrator, service: Service, receiver: _Receiver, jwt_secret: str, folder: Path
) -> bool:
    backend = mint_token(jwt_secret, "platform-backend", scopes=(SCOPE_DIRECTORY, SCOPE_PUBLISH))
    admin = mint_token(jwt_secret, _ADMIN)
    base = service.http_url

    say.step("A whole service is up on this machine, with a throwaway database:")
    say.line(f"gRPC          {service.grpc_target} (reflection on)")
    say.line(f"REST gateway  {base} (OpenAPI at {base}/api/openapi.json)")
    say.line(f"SQLite        {folder / 'demo.db'}")
    say.line(f"A receiver at {receiver.url} checks every signature.")

    async with grpc.aio.insecure_channel(service.grpc_target) as channel:
        directory = directory_service_pb2_grpc.DirectoryServiceStub(channel)
        say.step("The platform's backend feeds the directory (DirectoryService):")
        await directory.UpsertWorkspace(
            directory_service_pb2.UpsertWorkspaceRequest(
                workspace_id=_WORKSPACE, name="Demo city", tier="changemaker"
            ),
            metadata=_bearer(backend),
        )
        say.line(f'workspace {_WORKSPACE} "Demo city" on the changemaker tier')
        await directory.UpsertProject(
            directory_service_pb2.UpsertProjectRequest(
                project_id=_PROJECT, workspace_id=_WORKSPACE, name="Town hall", language="en"
            ),
            metadata=_bearer(backend),
        )
        say.line(f'project {_PROJECT} "Town hall"')
        await directory.SetMembership(
            directory_service_pb2.SetMembershipRequest(
                workspace_id=_WORKSPACE, user_id=_ADMIN, role="admin"
            ),
            metadata=_bearer(backend),
        )
        say.line(f"user {_ADMIN} is an admin of the workspace")

        async with aiohttp.ClientSession() as http:
            say.step("The admin registers a webhook over REST, as the integrations tab does:")
            types = [
                "conversation.started",
                "conversation.transcribed",
                "conversation.summarized",
                "report.generated",
            ]
            async with http.post(
                f"{base}/api/projects/{_PROJECT}/webhooks",
                headers={"Authorization": f"Bearer {admin}"},
                json={"name": "CRM sync", "url": receiver.url, "events": types},
            ) as response:
                created: dict[str, Any] = await response.json()
                status = response.status
            say.line(f"POST /api/projects/{_PROJECT}/webhooks -> {status}")
            if status != 201:
                say.line(f"The service refused it: {created.get('detail', created)}")
                return False
            webhook_id = str(created["id"])
            receiver.secret = str(created["secret"])
            say.line(f"id      {webhook_id}")
            say.line(f"secret  {_masked(receiver.secret)}")
            say.line(f"events  {', '.join(created['events'])}")

            events = _events(datetime.now(UTC))
            say.step("The backend publishes one event of each type (EventService.PublishEvents):")
            publisher = event_service_pb2_grpc.EventServiceStub(channel)
            answer = await publisher.PublishEvents(
                event_service_pb2.PublishEventsRequest(events=events),
                metadata=_bearer(backend),
            )
            for result in answer.results:
                say.line(
                    f"{result.event_id:<26} stored with {result.delivery_count} "
                    f"deliver{'y' if result.delivery_count == 1 else 'ies'}"
                )
            say.line("Each call returns once its events and deliveries are committed.")

            wanted = {event.id for event in events}
            arrived = await _wait_for(receiver, wanted, time.monotonic() + _DEADLINE_SECONDS)
            say.step("What the receiver got:")
            _show_requests(say, receiver.requests)
            if not arrived:
                missing = ", ".join(sorted(wanted - receiver.answered_ok()))
                say.line(f"Not every event arrived within {_DEADLINE_SECONDS:g} s: {missing}")
                return False

            say.step(f"The delivery log (GET .../webhooks/{webhook_id}/deliveries):")
            log = await _delivery_log(http, base, admin, webhook_id, len(events))
            _show_log(say, log)

    say.step("One request in full, as the receiver got it:")
    _show_one(say, next(r for r in receiver.requests if r.event_type == "conversation.summarized"))
    return all(r.body_signature_ok and r.standard_signature_ok for r in receiver.requests)


def _show_requests(say: _Narrator, requests: Sequence[_Request]) -> None:
    seen: set[str] = set()
    for request in requests:
        again = " (again)" if request.event_id in seen else ""
        seen.add(request.event_id)
        say.line(
            f"{request.event_type:<25} {_signatures(request)}, answered {request.answered}{again}"
        )
    if any(r.answered == 503 for r in requests):
        say.line(f"The receiver refused the first {_REFUSED_TYPE} request with 503;")
        say.line("the service sent it again a second later (this demo's retry schedule),")
        say.line("with the same webhook-id and X-Dembrane-Delivery.")


def _show_log(say: _Narrator, deliveries: Sequence[dict[str, Any]]) -> None:
    for delivery in sorted(deliveries, key=lambda d: str(d.get("event_type", ""))):
        attempts = sorted(delivery.get("attempts", []), key=lambda a: int(a.get("number", 0)))
        codes = ", then ".join(str(a.get("status_code", "no answer")) for a in attempts)
        say.line(
            f"{delivery.get('event_type', ''):<25} {delivery.get('status', ''):<10} "
            f"{len(attempts)} attempt{'' if len(attempts) == 1 else 's'}: {codes}"
        )


def _show_one(say: _Narrator, request: _Request) -> None:
    say.line(f"POST {_HOOK_PATH}")
    for name in (
        "Content-Type",
        "User-Agent",
        "X-Dembrane-Event",
        "X-Dembrane-Delivery",
        "X-Dembrane-Signature",
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
    ):
        say.line(f"{name}: {request.headers.get(name, '')}")
    say.line()
    for text in json.dumps(json.loads(request.body), indent=2).splitlines():
        say.line(text)


async def run_demo(out: TextIO, *, keep: bool = False) -> int:
    """Run the demo, narrating to ``out``; returns the exit status (0 when all went well)."""
    folder = Path(tempfile.mkdtemp(prefix="dembrane-webhooks-demo-"))
    jwt_secret = secrets.token_urlsafe(32)
    say = _Narrator(out)
    out.write("dembrane-webhooks demo: an event's way from the platform to a receiver.\n")
    # The narration says what happens; the service's own log would only repeat it.
    service_log = logging.getLogger("dembrane.webhooks")
    level = service_log.level
    service_log.setLevel(logging.WARNING)
    receiver = _Receiver()
    service = Service(_settings(folder, jwt_secret))
    ok = False
    interrupted = False
    tour: asyncio.Task[bool] | None = None

    def interrupt() -> None:
        # Ctrl-C stops the walk-through, never the clean-up that follows it.
        nonlocal interrupted
        interrupted = True
        if tour is not None:
            tour.cancel()

    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            loop.add_signal_handler(signum, interrupt)
            handled.append(signum)
    try:
        await receiver.start()
        await service.start()
        try:
            if not interrupted:
                tour = asyncio.create_task(_tour(say, service, receiver, jwt_secret, folder))
                try:
                    ok = await tour
                except asyncio.CancelledError:
                    if not interrupted:
                        raise
        finally:
            await service.stop()
    finally:
        await receiver.stop()
        service_log.setLevel(level)
        if keep:
            out.write(f"\nThe database is kept in {folder}.\n")
        else:
            shutil.rmtree(folder, ignore_errors=True)
        for signum in handled:
            loop.remove_signal_handler(signum)
    if interrupted:
        out.write(
            "\nInterrupted: the service has stopped"
            + ("" if keep else " and its database is gone")
            + ".\n"
        )
        return 130
    out.write(
        "\nDone: the service has stopped"
        + ("" if keep else " and its database is gone")
        + (".\n" if ok else ", but something did not go as it should (see above).\n")
    )
    return 0 if ok else 1
