"""The retry policy: the durable schedule, its jitter, Retry-After, and in-process retries."""

from __future__ import annotations

import asyncio
import ipaddress
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from dembrane.webhooks.config import DEFAULT_RETRY_SCHEDULE, Settings
from dembrane.webhooks.delivery.retry import RetryPolicy, is_transient, trips_breaker
from dembrane.webhooks.delivery.sender import AttemptOutcome, OutboundRequest, Sender
from dembrane.webhooks.delivery.targets import TargetPolicy


def outcome(
    status: int | None = 500, *, error: str = "", retry_after: float | None = None
) -> AttemptOutcome:
    return AttemptOutcome(
        status_code=status,
        latency=0.01,
        response_body="",
        error=error or ("" if status and status < 300 else "The receiver failed."),
        retry_after=retry_after,
        attempted_at=datetime.now(UTC),
    )


RESET = outcome(None, error="The receiver reset the connection.")


def test_the_default_schedule_is_the_contracts() -> None:
    """Without jitter the delays are 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h, then none."""
    policy = RetryPolicy(DEFAULT_RETRY_SCHEDULE, jitter=0)
    delays = [policy.delay_after(n, outcome()) for n in range(1, 9)]
    assert delays == [5, 300, 1800, 7200, 18000, 36000, 36000, None]
    assert policy.max_attempts == 8


def test_next_attempt_at_adds_the_delay_to_now() -> None:
    """The stored due time is now plus the scheduled delay; None once the schedule is used up."""
    policy = RetryPolicy((1, 1, 1), jitter=0)
    assert policy.next_attempt_at(1, outcome(), now=1000.0) == 1001.0
    assert policy.next_attempt_at(3, outcome(), now=1000.0) == 1001.0
    assert policy.next_attempt_at(4, outcome(), now=1000.0) is None


def test_jitter_stays_within_twenty_percent() -> None:
    """Each delay is spread by at most ±20 % and the spread is not constant."""
    policy = RetryPolicy((100, 1000), jitter=0.2, rng=random.Random(7))
    samples = [policy.delay_after(1, outcome()) for _ in range(500)]
    assert all(s is not None and 80 <= s <= 120 for s in samples)
    assert len(set(samples)) > 100
    later = [policy.delay_after(2, outcome()) for _ in range(200)]
    assert all(s is not None and 800 <= s <= 1200 for s in later)


def test_retry_after_lengthens_within_a_day_but_never_shortens() -> None:
    """A Retry-After longer than the schedule is honoured up to one day; a shorter one is not."""
    policy = RetryPolicy((5, 300), jitter=0)
    assert policy.delay_after(1, outcome(429, retry_after=120)) == 120
    assert policy.delay_after(2, outcome(503, retry_after=10)) == 300
    assert policy.delay_after(1, outcome(429, retry_after=10 * 86400)) == 86400
    # The schedule still decides when a delivery gives up.
    assert policy.delay_after(3, outcome(429, retry_after=60)) is None


def test_a_zero_schedule_waits_nothing() -> None:
    """With zeros and no jitter every retry is due at once (how tests run)."""
    policy = RetryPolicy.from_settings(Settings(retry_schedule=(0, 0, 0), retry_jitter=0))
    assert [policy.delay_after(n, outcome()) for n in (1, 2, 3, 4)] == [0, 0, 0, None]


def test_an_empty_schedule_means_a_single_attempt() -> None:
    """Without delays a delivery gets its first attempt only."""
    policy = RetryPolicy((), jitter=0.2)
    assert policy.max_attempts == 1
    assert policy.delay_after(1, outcome()) is None


def test_what_is_retried_in_process_and_what_trips_a_breaker() -> None:
    """Resets and quick 503s are retried at once; no answer, 5xx and 429 count against receivers."""
    assert is_transient(RESET)
    assert is_transient(
        outcome(None, error="The receiver closed the connection without a complete answer.")
    )
    assert is_transient(outcome(503))
    assert is_transient(outcome(503, retry_after=1))
    assert not is_transient(outcome(503, retry_after=120))
    assert not is_transient(outcome(None, error="No answer within 30 seconds."))
    assert not is_transient(outcome(None, error="Connection refused by 127.0.0.1:9."))
    assert not is_transient(outcome(500))
    assert not is_transient(outcome(200))
    assert trips_breaker(outcome(None, error="No answer within 30 seconds."))
    assert trips_breaker(outcome(502))
    assert trips_breaker(outcome(429))
    assert not trips_breaker(outcome(404))
    assert not trips_breaker(outcome(400))


class Script:
    """Answers attempts from a list, counting calls."""

    def __init__(self, *outcomes: AttemptOutcome) -> None:
        self.outcomes = list(outcomes)
        self.calls = 0

    async def __call__(self) -> AttemptOutcome:
        self.calls += 1
        return self.outcomes.pop(0)


async def test_a_reset_is_retried_at_once() -> None:
    """A reset connection is tried again in-process; every request is returned for the log."""
    policy = RetryPolicy((0, 0, 0), jitter=0)
    script = Script(RESET, outcome(200))
    outcomes = await policy.send(script, attempts_made=0, budget=5)
    assert [o.status_code for o in outcomes] == [None, 200]


async def test_lasting_failures_are_left_to_the_durable_schedule() -> None:
    """A 500 or a timeout is not retried in-process."""
    policy = RetryPolicy((0, 0, 0), jitter=0)
    for failure in (outcome(500), outcome(None, error="No answer within 30 seconds.")):
        script = Script(failure)
        assert len(await policy.send(script, attempts_made=0, budget=5)) == 1


async def test_in_process_retries_stay_within_the_attempt_budget() -> None:
    """In-process retries use only attempts the schedule has left, but one is always made."""
    policy = RetryPolicy((0, 0, 0), jitter=0, quick_retries=2)
    script = Script(RESET, RESET, RESET, RESET)
    assert len(await policy.send(script, attempts_made=0, budget=5)) == 3
    script = Script(RESET, RESET)
    assert len(await policy.send(script, attempts_made=3, budget=5)) == 1
    script = Script(RESET, RESET)
    assert len(await policy.send(script, attempts_made=9, budget=5)) == 1


class ResettingServer:
    """A raw TCP server that drops the first connection's request, then answers 200."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        data = b""
        while b"\r\n\r\n" not in data:
            data += await reader.read(65536)
        if self.connections == 1:
            writer.close()
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/hook"


@pytest.fixture
async def resetting() -> AsyncIterator[ResettingServer]:
    server = ResettingServer()
    server.server = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    try:
        yield server
    finally:
        server.server.close()
        await server.server.wait_closed()


async def test_a_real_dropped_connection_is_retried_by_the_sender(
    resetting: ResettingServer,
) -> None:
    """A receiver that drops the connection before answering gets a second request at once."""
    policy = RetryPolicy((0, 0, 0), jitter=0)
    async with Sender(
        connect_timeout=2,
        request_timeout=5,
        policy=TargetPolicy([ipaddress.ip_network("127.0.0.0/8")]),
    ) as sender:
        request = OutboundRequest(
            url=resetting.url,
            body=b"{}",
            event_type="conversation.started",
            event_id="evt-1",
            delivery_id="dlv-1",
            secrets=("secret-secret",),
        )
        outcomes = await policy.send(lambda: sender.send(request), attempts_made=0, budget=5)
    assert [o.status_code for o in outcomes] == [None, 200]
    assert is_transient(outcomes[0])
    assert resetting.connections == 2
