"""When a failed delivery is tried again: the retry policy, built from tenacity's primitives.

After a failed attempt ``next_attempt_at`` computes when the next one is due from a tenacity
wait strategy (the configured schedule with proportional jitter, a ``Retry-After`` answer
honoured within bounds), and the dispatcher stores that time on the delivery row, so a
restart loses nothing. Every request is one attempt and takes one slot of the schedule:
nothing is retried in-process, so a receiver that resets connections or answers 503 gets
the same patience as one that answers 500.

With a schedule of zeros and no jitter every wait is zero, which is how tests run fast.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from tenacity import RetryCallState, Retrying, stop_after_attempt, wait_chain, wait_fixed
from tenacity.wait import wait_base

from dembrane.webhooks.config import Settings
from dembrane.webhooks.delivery.sender import AttemptOutcome

__all__ = [
    "RETRY_AFTER_CAP_SECONDS",
    "RetryPolicy",
    "trips_breaker",
]

#: The longest pause a ``Retry-After`` header can impose on a delivery.
RETRY_AFTER_CAP_SECONDS = 86400.0


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


class RetryPolicy:
    """The retry schedule of deliveries.

    ``schedule`` lists the delays in seconds before each retry, after the immediate first
    attempt, so a delivery gets ``len(schedule) + 1`` attempts in all.
    """

    def __init__(
        self,
        schedule: Sequence[float],
        *,
        jitter: float = 0.2,
        retry_after_cap: float = RETRY_AFTER_CAP_SECONDS,
        rng: random.Random | None = None,
    ) -> None:
        self.schedule: tuple[float, ...] = tuple(float(d) for d in schedule)
        self.jitter = jitter
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
