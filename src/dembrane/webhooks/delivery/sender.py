"""The HTTP sender: one signed POST per attempt, its answer classified into an outcome.

One ``HttpClient`` serves every request so connections to a receiver are kept alive and
reused. A network problem never raises: refused connections, unresolvable hosts,
timeouts and refused targets all come back as an ``AttemptOutcome`` without a status code
and with one sentence saying what went wrong, ready for the delivery log.
"""

from __future__ import annotations

import asyncio
import codecs
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Protocol

from dembrane.webhooks.delivery.http import Failure, HttpClient, HttpFailure
from dembrane.webhooks.delivery.signing import signature_headers, user_agent
from dembrane.webhooks.delivery.targets import (
    PolicyResolver,
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

# Literal-IP checks and parsed targets are cached (per host, per URL): every delivery to a
# webhook asks the same; the cap only bounds memory on odd workloads.
_LITERAL_CACHE_SIZE = 4096
_URL_CACHE_SIZE = 4096


@dataclass(slots=True)
class OutboundRequest:
    """Everything one attempt needs: where to, what, and the secrets to sign with.

    Not frozen, though nothing changes one: one is made per request on the event loop, and a
    frozen dataclass's constructor takes twice as long (so for ``AttemptOutcome`` too).
    """

    url: str
    body: bytes
    event_type: str
    event_id: str
    delivery_id: str
    #: The current secret first; older ones still in a rotation's grace period after it.
    secrets: tuple[str, ...]


@dataclass(slots=True)
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


@dataclass(frozen=True, slots=True)
class _Target:
    """Where a webhook URL's requests go, and how their first lines read."""

    scheme: str
    host: str
    port: int
    #: The request line and ``Host`` header, ready to be followed by the other headers.
    start: str


def _target(raw: str) -> _Target | str:
    """The target of the webhook URL ``raw``, or why it cannot be sent to."""
    try:
        url = request_url(raw)
    except (ValueError, TypeError):
        return "The webhook URL is not a valid URL."
    host = url.raw_host
    scheme = url.scheme
    port = url.port
    if not host or scheme not in ("http", "https") or port is None:
        return "The webhook URL must be an http or https URL with a host."
    # The port is left out where it is the scheme's own, as browsers write it.
    shown = _host_port(host, None if url.is_default_port() else port)
    return _Target(
        scheme=scheme,
        host=host,
        port=port,
        start=f"POST {url.raw_path_qs} HTTP/1.1\r\nHost: {shown}\r\n",
    )


class Sender:
    """Sends signed webhook requests over one shared set of keep-alive connections.

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
        self._user_agent = user_agent()
        self._client: HttpClient | None = None
        self._resolver: PolicyResolver | None = None
        self._literal_checks: dict[str, str | None] = {}
        self._targets: dict[str, _Target | str] = {}

    async def start(self) -> None:
        """Open the client; idempotent."""
        if self._client is not None:
            return
        self._resolver = PolicyResolver(self._policy)
        self._client = HttpClient(
            resolver=self._resolver,
            connect_timeout=self._connect_timeout,
            request_timeout=self._request_timeout,
            max_connections=self._max_connections,
        )

    async def close(self) -> None:
        """Close the client and its connections; idempotent."""
        client, self._client = self._client, None
        resolver, self._resolver = self._resolver, None
        if client is not None:
            await client.close()
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

    def _target(self, raw: str) -> _Target | str:
        cache = self._targets
        try:
            return cache[raw]
        except KeyError:
            pass
        target = _target(raw)
        if len(cache) >= _URL_CACHE_SIZE:
            cache.clear()
        cache[raw] = target
        return target

    async def send(self, req: OutboundRequest, *, timestamp: int | None = None) -> AttemptOutcome:
        """POST ``req`` once, signed for this attempt, and classify the answer.

        ``timestamp`` (Unix seconds) defaults to now; it is signed into ``webhook-signature``.
        Never raises for network problems; raises ``RuntimeError`` if the sender is not started.
        """
        client = self._client
        if client is None:
            raise RuntimeError("The sender is not started; await Sender.start() first.")
        attempted_at = datetime.now(UTC)
        started = time.perf_counter()

        target = self._target(req.url)
        if isinstance(target, str):
            return self._failed(attempted_at, started, target)
        host = target.host
        # IP literals are never resolved, so they are judged here.
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
        head = "".join(
            [
                target.start,
                *[f"{name}: {value}\r\n" for name, value in headers.items()],
                f"Content-Length: {len(req.body)}\r\n\r\n",
            ]
        ).encode()

        try:
            answer = await client.post(
                (target.scheme, host, target.port), head, req.body, limit=RESPONSE_BODY_LIMIT
            )
        except HttpFailure as failure:
            reason = self._describe_failure(failure, host, target.port)
            return self._failed(attempted_at, started, reason)
        latency = time.perf_counter() - started

        status = answer.status
        if 200 <= status < 300:
            error = ""
        elif 300 <= status < 400:
            # The header is the receiver's text: undecodable bytes, line breaks and all.
            location = answer.location
            error = (
                one_line(
                    f"The receiver answered with a redirect to {location[:500]}, which is not "
                    "followed."
                )
                if location
                else f"The receiver answered with a redirect (status {status}), "
                "which is not followed."
            )
        elif answer.broken is not None:
            # The receiver gave its status, then its body broke off: the status is its
            # answer (a 2xx still accepts the event), and the log says what went wrong.
            reason = self._describe_failure(answer.broken, host, target.port)
            error = f"The receiver answered with status {status}, then: {reason}"
        else:
            error = f"The receiver answered with status {status}."
        retry_after = answer.retry_after
        return AttemptOutcome(
            status_code=status,
            latency=latency,
            # A NUL would not fit a PostgreSQL text column, and the log must always be written.
            response_body=printable(_decoded_excerpt(answer.body, RESPONSE_BODY_LIMIT)),
            error=error,
            retry_after=(
                None
                if retry_after is None or status not in _RETRY_AFTER_STATUSES
                else parse_retry_after(retry_after, datetime.now(UTC))
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

    def _describe_failure(self, failure: HttpFailure, host: str, port: int) -> str:
        # Messages name host and port only: a URL may carry tokens in its query string.
        where = _host_port(host, port)
        detail = one_line(failure.detail).rstrip(".")
        match failure.kind:
            case Failure.CONNECT_TIMEOUT:
                return f"Could not connect to {where} within {self._connect_timeout:g} seconds."
            case Failure.TIMEOUT:
                return f"No answer within {self._request_timeout:g} seconds."
            case Failure.BLOCKED:
                return failure.detail
            case Failure.UNRESOLVED:
                return f"The host {host} could not be resolved."
            case Failure.CERTIFICATE:
                return f"The TLS certificate of {where} could not be verified."
            case Failure.TLS:
                return f"The TLS handshake with {where} failed."
            case Failure.REFUSED:
                return f"Connection refused by {where}."
            case Failure.CONNECT:
                return f"Could not connect to {where}: {detail or 'the connection failed'}."
            case Failure.CLOSED:
                return "The receiver closed the connection without a complete answer."
            case Failure.RESET:
                return "The receiver reset the connection."
            case Failure.INVALID:
                return f"The receiver's answer is not valid HTTP: {detail or 'unreadable'}."
