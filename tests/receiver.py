"""A real webhook receiver for tests: an aiohttp server that records and verifies requests.

It listens on 127.0.0.1 on a free port, keeps every request it gets (headers and exact
body bytes), and checks each one the three ways a customer's endpoint may:

* ``body``: ``X-Dembrane-Signature`` is the HMAC-SHA256 of the body bytes (GitHub style);
* ``legacy``: ``X-Webhook-Signature`` is the HMAC of the body parsed and re-serialized
  canonically, as receivers written against the platform's earlier webhooks compute it;
* ``standard``: ``webhook-signature`` passes the ``standardwebhooks`` library's check.

Answers follow a script: ``respond(Reply(503), Reply(200))`` makes the first request fail
and the second succeed; once the script is used up, ``default`` answers.

    async with Receiver(secret="whsec_...") as receiver:
        ...send to receiver.url...
        await receiver.wait_for(1)
        assert receiver.requests[0].verified
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import socket
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

__all__ = ["ReceivedRequest", "Receiver", "Reply", "standard_webhook_for", "unused_port"]


@dataclass(frozen=True)
class Reply:
    """One scripted answer: status, body and headers, sent after ``delay`` seconds."""

    status: int = 200
    body: bytes = b"ok"
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass(frozen=True)
class ReceivedRequest:
    """One request as the receiver got it, with the outcome of each signature check.

    ``headers`` look up case-insensitively. A check is None when the receiver has no secret.
    """

    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes
    received_at: float
    body_signature_ok: bool | None
    legacy_signature_ok: bool | None
    standard_signature_ok: bool | None

    @property
    def verified(self) -> bool:
        """Whether all three checks passed."""
        return (
            self.body_signature_ok is True
            and self.legacy_signature_ok is True
            and self.standard_signature_ok is True
        )

    def json(self) -> object:
        """The parsed body."""
        return json.loads(self.body)


def standard_webhook_for(secret: str) -> Webhook:
    """A ``standardwebhooks`` verifier for ``secret``, in either of the service's forms.

    The library only takes ``whsec_<base64>`` secrets; a plain secret signs with its UTF-8
    bytes, which the library accepts once they are wrapped as ``whsec_`` + base64 of them.
    """
    if secret.startswith("whsec_"):
        return Webhook(secret)
    return Webhook("whsec_" + base64.b64encode(secret.encode()).decode())


def _hex_hmac(secret: str, message: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def _legacy_bytes(body: bytes) -> bytes | None:
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    return json.dumps(parsed, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def unused_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (just released), for refused connects."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class Receiver:
    """A signature-verifying webhook endpoint on 127.0.0.1, for tests.

    ``secret`` may be one secret or several (any of them verifying counts), or None to
    skip verification. Any method and path are accepted; ``url`` points at ``/hook``.
    """

    def __init__(
        self,
        secret: str | Sequence[str] | None = None,
        *,
        replies: Sequence[Reply | int] = (),
        default: Reply | int = 200,
    ) -> None:
        if isinstance(secret, str):
            self.secrets: tuple[str, ...] = (secret,)
        else:
            self.secrets = tuple(secret or ())
        self.default = _as_reply(default)
        self.requests: list[ReceivedRequest] = []
        self._script: deque[Reply] = deque(_as_reply(r) for r in replies)
        self._arrived = asyncio.Condition()
        self._stopping = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> Receiver:
        """Start listening on a free port of 127.0.0.1."""
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # A short shutdown timeout: tests must not wait on a handler that is still sleeping.
        self._runner = web.AppRunner(app, shutdown_timeout=0.5, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._port = int(self._runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        """Stop listening; handlers still delaying their answer are woken up first."""
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Receiver:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- addresses and scripting -------------------------------------------------------

    @property
    def port(self) -> int:
        """The port the receiver listens on."""
        if self._port is None:
            raise RuntimeError("The receiver is not started.")
        return self._port

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The endpoint to register as a webhook URL."""
        return f"{self.base_url}/hook"

    def respond(self, *replies: Reply | int) -> None:
        """Queue answers for the next requests (an int is a bare status)."""
        self._script.extend(_as_reply(r) for r in replies)

    async def wait_for(self, count: int, *, within: float = 5.0) -> list[ReceivedRequest]:
        """Wait up to ``within`` seconds for ``count`` requests to have arrived; return them all.

        Raises ``TimeoutError`` when fewer arrived in time.
        """
        async with asyncio.timeout(within), self._arrived:
            await self._arrived.wait_for(lambda: len(self.requests) >= count)
        return list(self.requests)

    # -- verification ----------------------------------------------------------------

    def _verify(
        self, headers: Mapping[str, str], body: bytes
    ) -> tuple[bool | None, bool | None, bool | None]:
        if not self.secrets:
            return None, None, None
        body_sig = headers.get("X-Dembrane-Signature", "")
        legacy_sig = headers.get("X-Webhook-Signature", "")
        legacy = _legacy_bytes(body)
        body_ok = any(hmac.compare_digest(_hex_hmac(s, body), body_sig) for s in self.secrets)
        legacy_ok = legacy is not None and any(
            hmac.compare_digest(_hex_hmac(s, legacy), legacy_sig) for s in self.secrets
        )
        standard_ok = False
        plain_headers = {key.lower(): value for key, value in headers.items()}
        for secret in self.secrets:
            try:
                standard_webhook_for(secret).verify(body, plain_headers, json_parse=False)
            except (WebhookVerificationError, ValueError):
                continue
            standard_ok = True
            break
        return body_ok, legacy_ok, standard_ok

    # -- the handler -----------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = CIMultiDictProxy(CIMultiDict(request.headers))
        body_ok, legacy_ok, standard_ok = self._verify(headers, body)
        record = ReceivedRequest(
            method=request.method,
            path=request.path_qs,
            headers=headers,
            body=body,
            received_at=time.time(),
            body_signature_ok=body_ok,
            legacy_signature_ok=legacy_ok,
            standard_signature_ok=standard_ok,
        )
        reply = self._script.popleft() if self._script else self.default
        async with self._arrived:
            self.requests.append(record)
            self._arrived.notify_all()
        if reply.delay > 0:
            # Wake early when the receiver stops, so shutting down never waits on a delay.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), reply.delay)
        return web.Response(status=reply.status, body=reply.body, headers=dict(reply.headers))


def _as_reply(reply: Reply | int) -> Reply:
    return reply if isinstance(reply, Reply) else Reply(status=reply)
