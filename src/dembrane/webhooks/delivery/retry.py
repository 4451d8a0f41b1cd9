"""When a failed delivery is tried again: the retry policy, built from tenacity's primitives.

Two levels of retry share one policy object:

* durable, long: after a failed attempt ``next_attempt_at`` computes when the next one is
  due from a tenacity wait strategy (the configured schedule with proportional jitter, a
  ``Retry-After`` answer honoured within bounds) and the dispatcher stores that time on the
  delivery row, so a restart loses nothing;
* in-process, short: ``send`` retries a connection reset or a ``503`` that asks for (at most)
  a second's pause at once, through ``tenacity.AsyncRetrying``, within the delivery's attempt
  budget. Every request it makes is an attempt of its own and is logged as such.

With a schedule of zeros and no jitter every wait is zero, which is how tests run fast.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Sequence

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    Retrying,
    retry_if_result,
    stop_after_attempt,
    stop_after_delay,
    wait_chain,
    wait_exponential,
    wait_fixed,
)
from tenacity.wait import wait_base

from dembrane.webhooks.config import Settings
from dembrane.webhooks.delivery.sender import AttemptOutcome

__all__ = [
    "RETRY_AFTER_CAP_SECONDS",
    "RetryPolicy",
    "is_transient",
    "trips_breaker",
]

#: The longest pause a ``Retry-After`` header can impose on a delivery.
RETRY_AFTER_CAP_SECONDS = 86400.0

# The sender's sentences for a connection the receiver dropped: the classic race of a
# keep-alive connection closed by the server just as a request went out, worth an immediate
# second try. Timeouts and refused connections are not: the receiver is slow or down.
_RESET_ERRORS = (
    "The receiver reset the connection",
    "The receiver closed the connection without a complete answer",
)

# A 503 whose Retry-After asks for no more than this is retried in-process.
_QUICK_RETRY_AFTER = 1.0


def is_transient(outcome: AttemptOutcome) -> bool:
    """Whether a failed attempt is worth an immediate in-process retry."""
    if outcome.status_code is None:
        return outcome.error.startswith(_RESET_ERRORS)
    if outcome.status_code == 503:
        return outcome.retry_after is None or outcome.retry_after <= _QUICK_RETRY_AFTER
    return False


def trips_breaker(outcome: AttemptOutcome) -> bool:
    """Whether a failed attempt says the receiver is unwell (no answer, 5xx or 429).

    Other 4xx answers come from a receiver that is up and refuses this one request, so they
    do not count towards opening a circuit breaker.
    """
    code = outcome.status_code
    return code is None or code >= 500 or code == 429


class _wait_jittered(wait_base):  # noqa: N801 - named like tenacity's own strategies
    """Scales the inner wait by a random factor in [1 - jitter, 1 + jitter]."""

    def __init__(self, inner: wait_base, jitter: float, rng: random.Random) -> None:
        self._inner = inner
        self._jitter = jitter
        self._rng = rng

    def __call__(self, retry_state: RetryCallState) -> float:
        delay = self._inner(retry_state)
        if self._jitter <= 0 or delay <= 0:
            return delay
        # Jitter only spreads retries of many deliveries apart; it guards no secret.
        factor = self._rng.uniform(1 - self._jitter, 1 + self._jitter)
        return delay * factor


class _wait_honouring_retry_after(wait_base):  # noqa: N801
    """The scheduled wait, or longer when the receiver's ``Retry-After`` asks for it.

    The header can lengthen the pause up to ``cap`` but never shorten it below the schedule:
    a receiver must not be able to make the service hammer it.
    """

    def __init__(self, scheduled: wait_base, cap: float) -> None:
        self._scheduled = scheduled
        self._cap = cap

    def __call__(self, retry_state: RetryCallState) -> float:
        delay = self._scheduled(retry_state)
        outcome = retry_state.outcome
        if outcome is None or outcome.failed:
            return delay
        result = outcome.result()
        if isinstance(result, AttemptOutcome) and result.retry_after is not None:
            return min(max(result.retry_after, delay), max(self._cap, delay))
        return delay


class _wait_offset(wait_base):  # noqa: N801
    """Evaluates ``inner`` as if the attempt number were ``offset`` higher.

    In-process retries count their attempts from one; the durable schedule counts every
    attempt the delivery ever made.
    """

    def __init__(self, inner: wait_base, offset: int) -> None:
        self._inner = inner
        self._offset = offset

    def __call__(self, retry_state: RetryCallState) -> float:
        real = retry_state.attempt_number
        retry_state.attempt_number = real + self._offset
        try:
            return self._inner(retry_state)
        finally:
            retry_state.attempt_number = real


class _wait_min(wait_base):  # noqa: N801
    """The shorter of two waits."""

    def __init__(self, first: wait_base, second: wait_base) -> None:
        self._first = first
        self._second = second

    def __call__(self, retry_state: RetryCallState) -> float:
        return min(self._first(retry_state), self._second(retry_state))


class RetryPolicy:
    """The retry schedule of deliveries, and the short in-process retries of one attempt.

    ``schedule`` lists the delays in seconds before each retry, after the immediate first
    attempt, so a delivery gets ``len(schedule) + 1`` attempts in all.
    """

    def __init__(
        self,
        schedule: Sequence[float],
        *,
        jitter: float = 0.2,
        retry_after_cap: float = RETRY_AFTER_CAP_SECONDS,
        quick_retries: int = 2,
        quick_wait: float = 0.1,
        rng: random.Random | None = None,
    ) -> None:
        self.schedule: tuple[float, ...] = tuple(float(d) for d in schedule)
        self.jitter = jitter
        self.quick_retries = quick_retries
        self._rng = rng or random.Random()  # noqa: S311 - spreads retries, guards nothing
        self._scheduled: wait_base = _wait_jittered(
            wait_chain(*(wait_fixed(d) for d in self.schedule)) if self.schedule else wait_fixed(0),
            jitter,
            self._rng,
        )
        self._durable = Retrying(
            stop=stop_after_attempt(self.max_attempts),
            wait=_wait_honouring_retry_after(self._scheduled, retry_after_cap),
        )
        # The in-process pause grows from ``quick_wait`` but never exceeds what the durable
        # schedule would wait at that point, so a schedule of zeros means no pause at all.
        self._quick_wait: wait_base = wait_exponential(multiplier=quick_wait, max=1.0)

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        """The policy the settings describe (``WEBHOOKS_RETRY_SCHEDULE`` and its jitter)."""
        return cls(settings.retry_schedule, jitter=settings.retry_jitter)

    @property
    def max_attempts(self) -> int:
        """How many attempts a delivery gets from the schedule: the first, then one per delay."""
        return len(self.schedule) + 1

    def delay_after(self, attempt_number: int, outcome: AttemptOutcome) -> float | None:
        """Seconds to wait after failed attempt ``attempt_number`` (1-based); None: give up."""
        state = RetryCallState(self._durable, fn=None, args=(), kwargs={})
        state.attempt_number = attempt_number
        state.set_result(outcome)
        if self._durable.stop(state):
            return None
        return float(self._durable.wait(state))

    def next_attempt_at(
        self, attempt_number: int, outcome: AttemptOutcome, now: float
    ) -> float | None:
        """When the attempt after failed attempt ``attempt_number`` is due (Unix seconds).

        None when the schedule is used up and the delivery has failed for good.
        """
        delay = self.delay_after(attempt_number, outcome)
        return None if delay is None else now + delay

    async def send(
        self,
        send_once: Callable[[], Awaitable[AttemptOutcome]],
        *,
        attempts_made: int,
        budget: float,
    ) -> list[AttemptOutcome]:
        """Make one attempt, retrying transient failures at once; return every outcome.

        ``attempts_made`` is how many attempts the delivery had before: in-process retries
        only use attempts the schedule still has (one attempt is always made, so a person's
        manual retry of an exhausted delivery still sends). ``budget`` bounds the seconds
        spent on retries after the first request.
        """
        remaining = max(1, self.max_attempts - attempts_made)
        tries = min(1 + self.quick_retries, remaining)
        first = await send_once()
        outcomes = [first]
        # The common case, an answer, needs no retry machinery at all.
        if tries == 1 or not is_transient(first):
            return outcomes

        # Tenacity takes over from the first outcome: it is replayed as the loop's first
        # attempt, so every wait and stop rule applies as if tenacity had made it.
        replay = [first]

        async def attempt() -> AttemptOutcome:
            if replay:
                return replay.pop()
            outcome = await send_once()
            outcomes.append(outcome)
            return outcome

        retrying = AsyncRetrying(
            stop=stop_after_attempt(tries) | stop_after_delay(budget),
            wait=_wait_min(self._quick_wait, _wait_offset(self._scheduled, attempts_made)),
            retry=retry_if_result(is_transient),
            # When the retries run out, the last outcome is the answer, not an exception.
            retry_error_callback=lambda state: state.outcome.result() if state.outcome else None,
        )
        await retrying(attempt)
        return outcomes
