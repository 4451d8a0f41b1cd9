"""The HTTP sender: one signed POST per attempt, its answer classified into an outcome.

One ``aiohttp.ClientSession`` serves every request so connections to a receiver are kept
alive and reused. A network problem never raises: refused connections, unresolvable hosts,
timeouts and refused targets all come back as an ``AttemptOutcome`` without a status code
and with one sentence saying what went wrong, ready for the delivery log.
"""

from __future__ import annotations

import asyncio
import codecs
import errno
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Protocol

import aiohttp
from yarl import URL

from dembrane.webhooks.delivery.signing import signature_headers, user_agent
from dembrane.webhooks.delivery.targets import (
    PolicyResolver,
    TargetBlockedError,
    TargetPolicy,
    literal_refusal,
    request_url,
)
from dembrane.webhooks.domain.text import one_line, printable

__all__ = [
    "RESPONSE_BODY_LIMIT",
    "AttemptOutcome",
    "OutboundRequest",
    "RequestSender",
    "Sender",
    "describe_test_outcome",
    "parse_retry_after",
]

#: How much of an answer's body is read and kept in the delivery log.
RESPONSE_BODY_LIMIT = 20_000

# Where a Retry-After header is honoured (Too Many Requests, Service Unavailable).
_RETRY_AFTER_STATUSES = frozenset({429, 503})

# Literal-IP checks and parsed URLs are cached (per host, per URL): every delivery to a
# webhook asks the same; the cap only bounds memory on odd workloads.
_LITERAL_CACHE_SIZE = 4096
_URL_CACHE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class OutboundRequest:
    """Everything one attempt needs: where to, what, and the secrets to sign with."""

    url: str
    body: bytes
    event_type: str
    event_id: str
    delivery_id: str
    #: The current secret first; older ones still in a rotation's grace period after it.
    secrets: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AttemptOutcome:
    """What one attempt gave: the status (None when no answer came) and what else is logged."""

    status_code: int | None
    #: Seconds from sending the request to having read the (bounded) answer or failed.
    latency: float
    #: At most the first 20 kB of the answer's body, decoded as UTF-8 with replacements.
    response_body: str
    #: One sentence saying why the attempt failed; empty on success.
    error: str
    #: Seconds the receiver asked to wait (Retry-After on 429/503), if it asked validly.
    retry_after: float | None
    attempted_at: datetime
    #: The service lost the attempt itself (its delivery worker process stopped): nothing is
    #: known of the receiver, which may or may not have the request.
    lost: bool = False

    @property
    def success(self) -> bool:
        """Whether the receiver accepted the event (any 2xx status)."""
        return self.status_code is not None and 200 <= self.status_code < 300

    @property
    def permanent_gone(self) -> bool:
        """Whether the receiver answered 410 Gone, which disables the webhook."""
        return self.status_code == 410


class RequestSender(Protocol):
    """What sends attempts: a ``Sender`` in this process, or a ``SenderPool`` of workers."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def send(
        self, req: OutboundRequest, *, timestamp: int | None = None
    ) -> AttemptOutcome: ...

    def submit(self, req: OutboundRequest) -> asyncio.Future[AttemptOutcome]:
        """Start sending ``req``; the future of its outcome. Cancelling it abandons the
        request (the receiver may or may not have it)."""
        ...


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delay in seconds or an HTTP date).

    None when the value is absent or cannot be read; a date in the past gives 0.
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    # Seconds are ASCII digits (a fraction tolerated); float() would also take other
    # scripts' digits, exponents and underscores.
    if value.isascii() and value.replace(".", "", 1).isdigit():
        seconds = float(value)
        return seconds if math.isfinite(seconds) else None
    if value[0].isdigit() or value[0] in "+-.":
        return None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        # HTTP dates are in GMT; a date without a zone is read that way.
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


def describe_test_outcome(outcome: AttemptOutcome) -> str:
    """The message the Test action reports for ``outcome``, worded as the contract fixes it."""
    code = outcome.status_code
    if code is None:
        return f"Failed to connect to webhook: {outcome.error}"
    if 200 <= code < 300:
        return f"Webhook responded successfully with status {code}"
    return f"Webhook returned error status {code}: {outcome.response_body[:200]}"


async def _read_bounded(content: aiohttp.StreamReader, limit: int, chunks: list[bytes]) -> None:
    """Read at most ``limit`` bytes of an answer into ``chunks``; what arrived before a
    failure stays there."""
    # Never read an answer whole: a receiver may stream gigabytes back.
    size = 0
    while size < limit:
        chunk = await content.read(limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)


def _decoded_excerpt(raw: bytes, limit: int) -> str:
    """``raw`` as UTF-8 text, with replacement characters for invalid bytes.

    When ``raw`` is an answer cut at ``limit`` bytes, a character the cut split in two is
    left out rather than shown as a replacement character the receiver never sent.
    """
    if len(raw) < limit:
        return raw.decode("utf-8", errors="replace")
    # Not final: an incomplete sequence at the end is held back, not replaced.
    return codecs.getincrementaldecoder("utf-8")(errors="replace").decode(raw, final=False)


def _host_port(host: str, port: int | None) -> str:
    shown = f"[{host}]" if ":" in host else host
    return shown if port is None else f"{shown}:{port}"


class Sender:
    """Sends signed webhook requests over one shared, keep-alive HTTP session.

    Use ``async with Sender(...) as sender`` or call ``start()`` and ``close()``.
    """

    def __init__(
        self,
        *,
        connect_timeout: float,
        request_timeout: float,
        policy: TargetPolicy,
        max_connections: int = 256,
    ) -> None:
        self._connect_timeout = connect_timeout
        self._request_timeout = request_timeout
        self._policy = policy
        self._max_connections = max_connections
        # aiohttp rounds timeouts of 5 s or more up to the loop clock's next whole second,
        # which made a 5 s timeout end anywhere up to 6 s; ``inf`` keeps them exact.
        self._timeout = aiohttp.ClientTimeout(
            total=request_timeout, sock_connect=connect_timeout, ceil_threshold=math.inf
        )
        self._user_agent = user_agent()
        self._session: aiohttp.ClientSession | None = None
        self._resolver: PolicyResolver | None = None
        self._literal_checks: dict[str, str | None] = {}
        self._urls: dict[str, URL] = {}

    async def start(self) -> None:
        """Open the session; idempotent."""
        if self._session is not None:
            return
        self._resolver = PolicyResolver(self._policy)
        connector = aiohttp.TCPConnector(limit=self._max_connections, resolver=self._resolver)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            # A receiver's cookies must never travel to another receiver.
            cookie_jar=aiohttp.DummyCookieJar(),
            # Only a bounded prefix of the answer is kept, so ask for it uncompressed
            # rather than inflate a body of unknown size.
            auto_decompress=False,
            skip_auto_headers=("Accept-Encoding",),
        )

    async def close(self) -> None:
        """Close the session and its connections; idempotent."""
        session, self._session = self._session, None
        resolver, self._resolver = self._resolver, None
        if session is not None:
            await session.close()
        # The connector closes only resolvers it made itself.
        if resolver is not None:
            await resolver.close()

    async def __aenter__(self) -> Sender:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    def _literal_refusal(self, host: str) -> str | None:
        cache = self._literal_checks
        try:
            return cache[host]
        except KeyError:
            pass
        if len(cache) >= _LITERAL_CACHE_SIZE:
            cache.clear()
        refusal = cache[host] = literal_refusal(host, self._policy)
        return refusal

    def _url(self, raw: str) -> URL:
        cache = self._urls
        try:
            return cache[raw]
        except KeyError:
            pass
        url = request_url(raw)
        if len(cache) >= _URL_CACHE_SIZE:
            cache.clear()
        cache[raw] = url
        return url

    async def send(self, req: OutboundRequest, *, timestamp: int | None = None) -> AttemptOutcome:
        """POST ``req`` once, signed for this attempt, and classify the answer.

        ``timestamp`` (Unix seconds) defaults to now; it is signed into ``webhook-signature``.
        Never raises for network problems; raises ``RuntimeError`` if the sender is not started.
        """
        session = self._session
        if session is None:
            raise RuntimeError("The sender is not started; await Sender.start() first.")
        attempted_at = datetime.now(UTC)
        started = time.perf_counter()

        try:
            url = self._url(req.url)
        except (ValueError, TypeError):
            return self._failed(attempted_at, started, "The webhook URL is not a valid URL.")
        host = url.raw_host
        if not host or url.scheme not in ("http", "https"):
            return self._failed(
                attempted_at, started, "The webhook URL must be an http or https URL with a host."
            )
        # IP literals never pass through the connector's resolver, so they are judged here.
        refusal = self._literal_refusal(host)
        if refusal is not None:
            return self._failed(attempted_at, started, refusal)

        headers = signature_headers(
            secrets=req.secrets,
            event_type=req.event_type,
            event_id=req.event_id,
            delivery_id=req.delivery_id,
            timestamp=int(time.time()) if timestamp is None else timestamp,
            body=req.body,
            user_agent=self._user_agent,
        )

        status: int | None = None
        location: str | None = None
        retry_after_header: str | None = None
        chunks: list[bytes] = []
        unread = ""
        try:
            async with session.post(
                url, data=req.body, headers=headers, allow_redirects=False
            ) as response:
                status = response.status
                location = response.headers.get("Location")
                if status in _RETRY_AFTER_STATUSES:
                    retry_after_header = response.headers.get("Retry-After")
                await _read_bounded(response.content, RESPONSE_BODY_LIMIT, chunks)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            reason = one_line(self._describe_failure(exc, host, url.port))
            if status is None:
                return self._failed(attempted_at, started, reason)
            # The receiver gave its status, then its body broke off: the status is its
            # answer (a 2xx still accepts the event), and the log says what went wrong.
            unread = f"The receiver answered with status {status}, then: {reason}"
        raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)

        latency = time.perf_counter() - started
        if 200 <= status < 300:
            error = ""
        elif 300 <= status < 400:
            # The header is the receiver's text: undecodable bytes, line breaks and all.
            error = (
                one_line(
                    f"The receiver answered with a redirect to {location[:500]}, which is not "
                    "followed."
                )
                if location
                else f"The receiver answered with a redirect (status {status}), "
                "which is not followed."
            )
        else:
            error = unread or f"The receiver answered with status {status}."
        return AttemptOutcome(
            status_code=status,
            latency=latency,
            # A NUL would not fit a PostgreSQL text column, and the log must always be written.
            response_body=printable(_decoded_excerpt(raw, RESPONSE_BODY_LIMIT)),
            error=error,
            retry_after=(
                None
                if retry_after_header is None
                else parse_retry_after(retry_after_header, datetime.now(UTC))
            ),
            attempted_at=attempted_at,
        )

    def submit(self, req: OutboundRequest) -> asyncio.Future[AttemptOutcome]:
        """``send`` as a task, whose future the dispatcher takes the outcome from."""
        return asyncio.ensure_future(self.send(req))

    @staticmethod
    def _failed(attempted_at: datetime, started: float, error: str) -> AttemptOutcome:
        return AttemptOutcome(
            status_code=None,
            latency=time.perf_counter() - started,
            response_body="",
            error=error,
            retry_after=None,
            attempted_at=attempted_at,
        )

    def _describe_failure(self, exc: BaseException, host: str, port: int | None) -> str:
        # Messages name host and port only: a URL may carry tokens in its query string.
        where = _host_port(host, port)
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return f"Could not connect to {where} within {self._connect_timeout:g} seconds."
        if isinstance(exc, TimeoutError):
            return f"No answer within {self._request_timeout:g} seconds."
        if isinstance(exc, aiohttp.ClientConnectorDNSError):
            if isinstance(exc.os_error, TargetBlockedError):
                return str(exc.os_error)
            return f"The host {host} could not be resolved."
        if isinstance(exc, aiohttp.ClientConnectorCertificateError):
            return f"The TLS certificate of {where} could not be verified."
        if isinstance(exc, aiohttp.ClientSSLError):
            return f"The TLS handshake with {where} failed."
        if isinstance(exc, aiohttp.ClientConnectorError):
            os_error = exc.os_error
            if os_error.errno == errno.ECONNREFUSED or isinstance(os_error, ConnectionRefusedError):
                return f"Connection refused by {where}."
            detail = os_error.strerror or str(os_error) or type(os_error).__name__
            return f"Could not connect to {where}: {detail.rstrip('.')}."
        if isinstance(exc, aiohttp.ServerDisconnectedError):
            return "The receiver closed the connection without a complete answer."
        if isinstance(exc, aiohttp.InvalidURL):
            return "The webhook URL is not a valid URL."
        if isinstance(exc, aiohttp.ClientPayloadError):
            return "The receiver's answer could not be read."
        if isinstance(exc, aiohttp.ClientResponseError):
            return f"The receiver's answer is not valid HTTP: {exc.message.rstrip('.')}."
        if isinstance(exc, aiohttp.ClientConnectionResetError | ConnectionResetError) or (
            isinstance(exc, OSError) and exc.errno == errno.ECONNRESET
        ):
            return "The receiver reset the connection."
        detail = str(exc) or type(exc).__name__
        return f"The request failed: {detail.rstrip('.')}."
