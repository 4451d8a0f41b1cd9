"""The HTTP/1.1 client that carries webhook requests: keep-alive POSTs, bounded answers.

A webhook attempt is always the same shape: one POST with a small, fully known body, and an
answer of which only the status, two headers and a bounded prefix of the body matter. A
general client spends most of its time on what that shape never needs (cookies, redirects,
streaming bodies, per-request option objects); this one writes the request in one call and
parses the answer with llhttp (through ``httptools``), at about a quarter of the CPU per
request.

What it keeps from a general client:

- connections are kept alive per scheme, host and port, and closed after
  ``keepalive`` seconds unused; a request that finds its reused connection closed by the
  receiver before any answer is sent once more on a fresh one (receivers deduplicate on
  ``webhook-id``, and a receiver that closed an idle connection never read the request);
- at most ``max_connections`` requests are in flight; more wait for a free slot;
- host names are resolved by a ``PolicyResolver`` and the socket connects to the very
  addresses it allowed, so a name cannot pass the check and then point elsewhere;
- TLS verifies the receiver's certificate against the system's trust store;
- every failure is an ``HttpFailure`` whose kind says what went wrong, for the sender to
  put into words.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import socket
import ssl
from collections import deque
from dataclasses import dataclass
from typing import cast

import httptools

from dembrane.webhooks.delivery.targets import PolicyResolver, TargetBlockedError, is_ip_literal

__all__ = ["Answer", "Failure", "HttpClient", "HttpFailure"]

# How long an unused connection is kept open, as general clients do (aiohttp's default).
DEFAULT_KEEPALIVE = 15.0


class Failure(enum.Enum):
    """What kind of failure ended a request without an answer."""

    CONNECT_TIMEOUT = "connect-timeout"
    TIMEOUT = "timeout"
    UNRESOLVED = "unresolved"
    BLOCKED = "blocked"
    CERTIFICATE = "certificate"
    TLS = "tls"
    REFUSED = "refused"
    CONNECT = "connect"
    CLOSED = "closed"
    RESET = "reset"
    INVALID = "invalid"


class HttpFailure(Exception):
    """A request that got no (complete) status line and headers; ``detail`` is the
    operating system's or the parser's text, where there is one."""

    def __init__(self, kind: Failure, detail: str = "") -> None:
        super().__init__(kind.value, detail)
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Answer:
    """A receiver's answer: its status, the headers the sender reads, and at most ``limit``
    bytes of its body."""

    status: int
    location: str | None
    retry_after: str | None
    body: bytes
    #: Why the body ended before the receiver said it would (None when it did not).
    broken: HttpFailure | None = None


def _header_text(raw: bytes) -> str:
    # Header values are bytes on the wire: ASCII as a rule, UTF-8 where a receiver puts a
    # non-ASCII URL in ``Location``; anything else comes out as replacement characters.
    return raw.decode("utf-8", "replace")


class _Connection(asyncio.Protocol):
    """One keep-alive connection and the answer it is reading."""

    __slots__ = (
        "_body",
        "_expected_end",
        "_limit",
        "_location",
        "_loop",
        "_parser",
        "_retry_after",
        "_size",
        "_status",
        "_waiter",
        "closed",
        "heard",
        "idle_since",
        "key",
        "reusable",
        "transport",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, key: tuple[str, str, int]) -> None:
        self._loop = loop
        self.key = key
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[Answer] | None = None
        self._status = 0
        self._location: str | None = None
        self._retry_after: str | None = None
        self._expected_end = False
        self._body: list[bytes] = []
        self._size = 0
        self._limit = 0
        self.closed = False
        #: Whether any byte of the current answer has arrived.
        self.heard = False
        self.reusable = False
        self.idle_since = 0.0

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio's, though they offer the same.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:
            # A receiver talking out of turn: the connection can no longer be trusted.
            self.close()
            return
        self.heard = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(HttpFailure(Failure.INVALID, str(exc)))
            self.close()
        if self._waiter is not None and self._waiter.done():
            self._waiter = None

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        self._waiter = None
        reset = isinstance(exc, ConnectionResetError)
        ended = HttpFailure(Failure.RESET if reset else Failure.CLOSED, str(exc or ""))
        if not self._status:
            waiter.set_exception(ended)
        elif not self._expected_end and not reset:
            # No length and no chunks: the body is what came before the connection closed.
            waiter.set_result(self._answer(None))
        else:
            waiter.set_result(self._answer(ended))

    # -- httptools callbacks

    def on_message_begin(self) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            # More than the answer came: the connection is out of step and is not used again.
            self.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        lowered = name.lower()
        if lowered == b"location":
            self._location = _header_text(value)
        elif lowered == b"retry-after":
            self._retry_after = _header_text(value)
        elif lowered == b"content-length" or lowered == b"transfer-encoding":
            self._expected_end = True

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            # An interim answer (100 Continue, 103 Early Hints): the real one follows.
            self._location = self._retry_after = None
            self._expected_end = False
            return
        self._status = status

    def on_body(self, body: bytes) -> None:
        room = self._limit - self._size
        if room <= 0:
            return
        if len(body) > room:
            body = body[:room]
        self._body.append(body)
        self._size += len(body)
        if self._size >= self._limit:
            # Enough is kept; the rest of a long answer is not read, nor is the connection
            # kept, since the rest would still arrive on it.
            self._finish(self._answer(None))
            self.close()

    def on_message_complete(self) -> None:
        if not self._status:
            return  # the end of an interim answer
        self.reusable = not self.closed and self._parser.should_keep_alive()
        self._finish(self._answer(None))

    # -- the request

    def request(self, data: list[bytes], limit: int) -> asyncio.Future[Answer]:
        """Write ``data`` (the request) and the future of its answer."""
        assert self.transport is not None
        waiter = self._waiter = self._loop.create_future()
        self._status = 0
        self._location = self._retry_after = None
        self._expected_end = False
        self._body = []
        self._size = 0
        self._limit = limit
        self.heard = False
        self.reusable = False
        self.transport.writelines(data)
        return waiter

    def close(self) -> None:
        self.reusable = False
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _answer(self, broken: HttpFailure | None) -> Answer:
        body = self._body
        return Answer(
            status=self._status,
            location=self._location,
            retry_after=self._retry_after,
            body=body[0] if len(body) == 1 else b"".join(body),
            broken=broken,
        )

    def _finish(self, answer: Answer) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(answer)

    def _fail(self, failure: HttpFailure) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(failure)


def _expire(waiter: asyncio.Future[Answer]) -> None:
    if not waiter.done():
        waiter.set_exception(HttpFailure(Failure.TIMEOUT))


class HttpClient:
    """Keep-alive HTTP/1.1 POSTs to any number of receivers; see the module's text."""

    def __init__(
        self,
        *,
        resolver: PolicyResolver,
        connect_timeout: float,
        request_timeout: float,
        max_connections: int,
        keepalive: float = DEFAULT_KEEPALIVE,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._resolver = resolver
        self._connect_timeout = connect_timeout
        self._request_timeout = request_timeout
        self._keepalive = keepalive
        self._ssl = ssl_context
        self._slots = asyncio.Semaphore(max(1, max_connections))
        self._idle: dict[tuple[str, str, int], deque[_Connection]] = {}
        self._busy: set[_Connection] = set()
        self._sweep: asyncio.TimerHandle | None = None
        self._closed = False

    async def post(
        self,
        key: tuple[str, str, int],
        head: bytes,
        body: bytes,
        *,
        limit: int,
    ) -> Answer:
        """Send ``head`` (request line and headers) and ``body`` to ``key`` (scheme, host,
        port) and read the answer, at most ``limit`` bytes of its body.

        Raises ``HttpFailure`` when no answer came, within the request timeout in all.
        """
        if self._closed:
            raise RuntimeError("The HTTP client is closed.")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._request_timeout
        slots = self._slots
        if slots.locked():
            try:
                async with asyncio.timeout_at(deadline):
                    await slots.acquire()
            except TimeoutError:
                raise HttpFailure(Failure.TIMEOUT) from None
        else:
            await slots.acquire()
        data = [head, body]
        try:
            kept = self._idle_connection(key, loop)
            if kept is not None:
                try:
                    return await self._exchange(kept, data, limit, deadline, loop)
                except HttpFailure as failure:
                    if kept.heard or failure.kind not in (Failure.CLOSED, Failure.RESET):
                        raise
                    # The receiver had closed the kept connection: once more on a new one.
            connection = await self._connect(key, loop, deadline)
            return await self._exchange(connection, data, limit, deadline, loop)
        finally:
            slots.release()

    async def _exchange(
        self,
        connection: _Connection,
        data: list[bytes],
        limit: int,
        deadline: float,
        loop: asyncio.AbstractEventLoop,
    ) -> Answer:
        waiter = connection.request(data, limit)
        timer = loop.call_at(deadline, _expire, waiter)
        self._busy.add(connection)
        try:
            answer = await waiter
        except BaseException:
            # Failed, timed out or cancelled: what else would arrive on it is unknown.
            connection.close()
            raise
        finally:
            timer.cancel()
            self._busy.discard(connection)
        if connection.reusable and not self._closed:
            self._keep(connection, loop)
        else:
            connection.close()
        return answer

    def _idle_connection(
        self, key: tuple[str, str, int], loop: asyncio.AbstractEventLoop
    ) -> _Connection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        oldest_kept = loop.time() - self._keepalive
        while idle:
            connection = idle.pop()
            if connection.closed or connection.idle_since < oldest_kept:
                connection.close()
                continue
            return connection
        return None

    def _keep(self, connection: _Connection, loop: asyncio.AbstractEventLoop) -> None:
        connection.idle_since = loop.time()
        idle = self._idle.get(connection.key)
        if idle is None:
            idle = self._idle[connection.key] = deque()
        idle.append(connection)
        if self._sweep is None:
            self._sweep = loop.call_later(self._keepalive, self._close_expired, loop)

    def _close_expired(self, loop: asyncio.AbstractEventLoop) -> None:
        self._sweep = None
        oldest_kept = loop.time() - self._keepalive
        for key, idle in list(self._idle.items()):
            # The most recently used are at the right; the expired ones at the left.
            while idle and (idle[0].closed or idle[0].idle_since < oldest_kept):
                idle.popleft().close()
            if not idle:
                del self._idle[key]
        if self._idle:
            self._sweep = loop.call_later(self._keepalive / 2, self._close_expired, loop)

    async def _connect(
        self, key: tuple[str, str, int], loop: asyncio.AbstractEventLoop, deadline: float
    ) -> _Connection:
        host, port = key[1], key[2]
        connect_by = min(deadline, loop.time() + self._connect_timeout)
        try:
            async with asyncio.timeout_at(connect_by):
                addresses = await self._addresses(host, port)
                return await self._open(key, addresses, loop)
        except TimeoutError:
            if connect_by < deadline:
                raise HttpFailure(Failure.CONNECT_TIMEOUT) from None
            raise HttpFailure(Failure.TIMEOUT) from None

    async def _addresses(self, host: str, port: int) -> list[tuple[int, str]]:
        if is_ip_literal(host):
            return [(socket.AF_INET6 if ":" in host else socket.AF_INET, host)]
        try:
            results = await self._resolver.resolve(host, port, socket.AF_UNSPEC)
        except TargetBlockedError as exc:
            raise HttpFailure(Failure.BLOCKED, str(exc)) from None
        except OSError as exc:
            raise HttpFailure(Failure.UNRESOLVED, exc.strerror or str(exc)) from None
        return [(result["family"], result["host"]) for result in results]

    async def _open(
        self,
        key: tuple[str, str, int],
        addresses: list[tuple[int, str]],
        loop: asyncio.AbstractEventLoop,
    ) -> _Connection:
        scheme, host, port = key
        tls = None
        if scheme == "https":
            tls = self._ssl if self._ssl is not None else _default_context()
        failure: HttpFailure | None = None
        factory = functools.partial(_Connection, loop, key)
        for family, address in addresses:
            try:
                _, connection = await loop.create_connection(
                    factory,
                    address,
                    port,
                    family=family,
                    ssl=tls,
                    server_hostname=host if tls is not None else None,
                )
            except ssl.SSLCertVerificationError as exc:
                failure = HttpFailure(Failure.CERTIFICATE, exc.verify_message or str(exc))
            except ssl.SSLError as exc:
                failure = HttpFailure(Failure.TLS, exc.reason or str(exc))
            except ConnectionRefusedError as exc:
                failure = HttpFailure(Failure.REFUSED, exc.strerror or "")
            except (OSError, ValueError) as exc:
                detail = exc.strerror if isinstance(exc, OSError) else None
                failure = HttpFailure(Failure.CONNECT, detail or str(exc))
            else:
                return connection
        assert failure is not None
        raise failure

    async def close(self) -> None:
        """Close every connection; requests still in flight fail as closed."""
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()
        for connection in list(self._busy):
            connection.close()
        # Let the transports finish closing before the loop may end.
        await asyncio.sleep(0)


@functools.cache
def _default_context() -> ssl.SSLContext:
    """The system trust store's context, made once (loading it takes milliseconds)."""
    return ssl.create_default_context()
