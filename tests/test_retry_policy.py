"""The retry policy: the durable schedule, its jitter, Retry-After, and breaker trips."""

from __future__ import annotations

import random
from datetime import UTC, datetime

from dembrane.webhooks.config import DEFAULT_RETRY_SCHEDULE, Settings
from dembrane.webhooks.delivery.retry import RetryPolicy, trips_breaker
from dembrane.webhooks.delivery.sender import AttemptOutcome


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


def test_a_reset_or_a_503_waits_for_its_slot_like_any_failure() -> None:
    """A dropped connection or a 503 (with or without a short Retry-After) is due after the
    scheduled delay: it takes one slot, never several at once."""
    policy = RetryPolicy(DEFAULT_RETRY_SCHEDULE, jitter=0)
    for failure in (RESET, outcome(503), outcome(503, retry_after=1)):
        delays = [policy.delay_after(n, failure) for n in range(1, 9)]
        assert delays == [5, 300, 1800, 7200, 18000, 36000, 36000, None]


def test_what_trips_a_breaker() -> None:
    """No answer, 5xx and 429 count against a receiver; other 4xx answers do not."""
    assert trips_breaker(outcome(None, error="No answer within 30 seconds."))
    assert trips_breaker(RESET)
    assert trips_breaker(outcome(502))
    assert trips_breaker(outcome(429))
    assert not trips_breaker(outcome(404))
    assert not trips_breaker(outcome(400))
