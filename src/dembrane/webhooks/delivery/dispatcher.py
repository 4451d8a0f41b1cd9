"""The dispatcher: claims due deliveries, sends them, and records what came of them.

One claim loop leases due rows in batches (``store.outbox.claim_due``) and hands each to the
lane of its webhook. Lanes run at most ``per_webhook_concurrency`` requests at once, all
lanes together at most ``max_concurrency``, taking turns for free slots. Finished sends queue
their results, and one flush loop writes whatever has gathered in one transaction, so a busy
dispatcher commits many outcomes per round trip.

A slow or dead receiver must not hold the dispatcher's capacity:

* a lane whose oldest request in flight has run far longer than the receiver usually takes
  (at least a second) is stalled: it hands the rows it holds back to the store, due again
  later, and takes no new ones, so it keeps no more than its own requests in flight and the
  other lanes get the claims; a healthy lane, however busy, never hands anything back;
* requests to receivers not known to answer (a lane with no answer yet, whose last requests
  failed, or that is stalled) have ``SUSPECT_SHARE`` of ``max_concurrency`` in slots of
  their own, beside the ``max_concurrency`` slots of receivers that answer, so however many
  webhooks hang, the ones that answer keep every slot; a new lane's first request may take
  an answering receiver's slot while ``RESERVE_SHARE`` of those stays free, so a new
  webhook's first delivery seldom waits for dead ones;
* a circuit breaker per webhook opens after consecutive failures (no answer, 5xx, 429): the
  webhook's rows in the store are pushed to the cool-down's end in one statement, and rows
  that come up meanwhile go back to the store, unsent and without using an attempt, until a
  single probe request after the cool-down succeeds;
* a lane holds at most ``LANE_HOLD_FACTOR`` times the per-webhook concurrency in rows:
  claims and publishing leases take no more of a webhook's rows than its lane has room
  for, so a webhook with a long backlog and a slow (but answering) receiver cannot fill
  the dispatcher's memory while other webhooks' rows, due later, wait in the store; a lane
  that drains to half its share wakes the claim loop;
* claims leave in the store the rows of webhooks that could not be sent to now (stalled,
  cooling down, or half-open with their probe in hand), unless a person changed the webhook
  since: such rows would only be claimed, held and handed back, over and over, taking the
  store's time and the room in memory that the healthy lanes need.

The loop sleeps until the earliest pending row is due, and wakes at once when
``Resources.wake_dispatcher`` is called (after a publish, a retry, a recovery). On stop it
stops claiming, hands back rows it has not started, gives requests in flight a moment to
finish, hands back those that do not, and writes everything before returning. Anything it
could not hand back comes due again when its lease runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from dataclasses import dataclass, replace

from dembrane.webhooks import metrics
from dembrane.webhooks.config import LEASE_MARGIN_SECONDS, Settings
from dembrane.webhooks.delivery.backlog import BacklogWatch
from dembrane.webhooks.delivery.indexing import IndexTask
from dembrane.webhooks.delivery.retention import RetentionTask
from dembrane.webhooks.delivery.retry import RetryPolicy, trips_breaker
from dembrane.webhooks.delivery.sender import AttemptOutcome, OutboundRequest
from dembrane.webhooks.domain.access import tier_allows_webhooks
from dembrane.webhooks.domain.ids import new_id
from dembrane.webhooks.resources import Resources
from dembrane.webhooks.store import outbox
from dembrane.webhooks.store.database import OutageLog, Transaction, store_unavailable
from dembrane.webhooks.store.journal import OutcomeJournal, read_journal, remove_journal
from dembrane.webhooks.store.listener import DueListener
from dembrane.webhooks.store.outbox import (
    AttemptRecord,
    DeliveryClaim,
    DeliveryResult,
    DeliveryState,
    HoldBack,
    Release,
)

__all__ = ["BreakerSettings", "CircuitBreaker", "Dispatcher"]

log = logging.getLogger(__name__)

#: The longest the claim loop sleeps when idle: a wake-up may be missed (a PostgreSQL
#: listener reconnecting) and the clock may move past a due time we did not hear of.
MAX_IDLE_SECONDS = 1.0
#: How often lanes are checked for rows they cannot send in time, while any row waits.
LANE_CHECK_SECONDS = 0.25
#: A lane is stalled when its oldest request has run this long, and STALL_FACTOR times the
#: receiver's usual latency.
STALL_SECONDS = 1.0
STALL_FACTOR = 4.0
#: Requests to webhooks not known to answer (a lane that never answered, whose last requests
#: failed, or that is stalled) have slots of their own, this share of ``max_concurrency``,
#: beside the ``max_concurrency`` slots of receivers that answer: however many dead ones
#: there are, those that answer keep every slot they had.
SUSPECT_SHARE = 0.5
#: The share of the answering receivers' slots kept from new webhooks' first requests
#: (which count as not known to answer, and may take one of those slots when the suspects'
#: are all taken, so a new webhook is not kept waiting by dead ones): however many new
#: webhooks hang, this much stays for receivers that answer.
RESERVE_SHARE = 0.25


def suspect_slots(max_concurrency: int, share: float = SUSPECT_SHARE) -> int:
    """The requests to receivers not known to answer that may be in flight together, beside
    the ``max_concurrency`` of receivers that answer."""
    return max(1, int(max_concurrency * share))


def most_in_flight(max_concurrency: int) -> int:
    """The most requests one dispatcher may have in flight: the connections its sender
    needs so that no request waits for one."""
    return max_concurrency + suspect_slots(max_concurrency)


#: The shortest pause for a row handed back by a stalled lane.
MIN_DEFER_SECONDS = 1.0
#: Outcomes are written together: a flush waits this long for more unless it has enough.
#: Receivers have their requests by then; only the delivery log waits, and fewer, larger
#: transactions leave the store free for publishing.
FLUSH_WINDOW_SECONDS = 0.05
FLUSH_BATCH = 256
#: A lane holds at most this many times the per-webhook concurrency in rows: a webhook with
#: a backlog cannot fill the dispatcher's memory and keep other webhooks' rows unclaimed.
LANE_HOLD_FACTOR = 4
#: After this many failed writes of the same outcomes, each is written on its own.
SPLIT_AFTER_FAILURES = 3
#: Lanes idle this long are forgotten (their breaker is closed by then).
LANE_IDLE_SECONDS = 600.0
#: The weight of the newest sample in a lane's moving average of latency.
LATENCY_SMOOTHING = 0.2
#: An attempt the service lost (its worker process stopped) is sent again after this pause,
#: time for the pool to start a replacement, and takes no slot of the retry schedule.
LOST_RETRY_SECONDS = 1.0
#: A delivery's lost attempts beyond this many take slots of the schedule: a request that
#: keeps taking its worker process down must come to an end. The count is kept in the
#: delivery's row, so a restart or another replica goes on from it.
LOST_RETRIES = 3

GONE_REASON = "The receiver answered 410 Gone, so the service disabled the webhook."
#: An attempt's error when the store refused the text that described it.
UNSTORABLE_ERROR = "The attempt failed; its description could not be stored."
CUT_OFF_ERROR = "The service stopped before the receiver answered; the delivery is sent again."


@dataclass(frozen=True)
class BreakerSettings:
    """When a webhook's circuit breaker opens, and for how long."""

    #: Consecutive failed attempts (no answer, 5xx, 429) that open the breaker.
    failure_threshold: int = 5
    #: The first cool-down; it doubles each time a probe fails, up to ``max_open_seconds``.
    open_seconds: float = 5.0
    max_open_seconds: float = 300.0


class CircuitBreaker:
    """Closed, open for a cool-down after consecutive failures, then half-open for one probe."""

    __slots__ = ("_settings", "failures", "open_until", "openings", "probing")

    def __init__(self, settings: BreakerSettings) -> None:
        self._settings = settings
        self.failures = 0
        #: Until when (Unix seconds) nothing is sent; None while closed.
        self.open_until: float | None = None
        self.openings = 0
        self.probing = False

    def is_open(self, now: float) -> bool:
        """Whether the cool-down is running: nothing may be sent."""
        return self.open_until is not None and now < self.open_until

    def is_half_open(self, now: float) -> bool:
        """Whether the cool-down is over but no probe has succeeded yet."""
        return self.open_until is not None and now >= self.open_until

    def may_start(self, now: float) -> bool:
        """Whether a request may start now (one probe at a time when half-open)."""
        if self.open_until is None:
            return True
        return now >= self.open_until and not self.probing

    def started(self, now: float) -> None:
        """Note that a request started (in the half-open state it is the probe)."""
        if self.is_half_open(now):
            self.probing = True

    def abandoned(self) -> None:
        """Note that a request ended without a result, so a probe may start again."""
        self.probing = False

    def record(self, *, alive: bool, now: float) -> None:
        """Count an attempt's result: ``alive`` when the receiver answered sensibly."""
        if alive:
            self.failures = 0
            self.open_until = None
            self.openings = 0
            self.probing = False
            return
        self.failures += 1
        if self.probing or (
            self.open_until is None and self.failures >= self._settings.failure_threshold
        ):
            self.openings += 1
            cool_down = min(
                self._settings.open_seconds * 2 ** (self.openings - 1),
                self._settings.max_open_seconds,
            )
            self.open_until = now + cool_down
            self.probing = False


@dataclass(slots=True)
class _Held:
    claim: DeliveryClaim
    #: When it was claimed (monotonic), to hand it back before its lease can run out.
    claimed_at: float


class _Lane:
    """One webhook's queue of claimed rows, its requests in flight, and its breaker."""

    __slots__ = (
        "breaker",
        "breaker_settings",
        "full",
        "gone",
        "gone_at",
        "in_flight",
        "last_used",
        "latency",
        "started",
        "status",
        "updated_at",
        "url",
        "waiting",
    )

    def __init__(self, breaker: BreakerSettings) -> None:
        self.breaker_settings = breaker
        self.waiting: deque[_Held] = deque()
        self.in_flight = 0
        #: Start times (monotonic) of the requests in flight, by delivery id.
        self.started: dict[str, float] = {}
        #: Moving average of request latency in seconds; None before the first answer.
        self.latency: float | None = None
        self.breaker = CircuitBreaker(breaker)
        #: Set when this process disabled the webhook: rows claimed before the store knew
        #: are not sent. ``gone_at`` is when, to notice a person re-enabling it later.
        self.gone: str | None = None
        self.gone_at = 0.0
        self.url = ""
        self.status = ""
        #: The webhook's ``updated_at`` as the last claim saw it.
        self.updated_at = 0.0
        self.last_used = time.monotonic()
        #: Claims leave the webhook's rows in the store: the lane holds its share.
        self.full = False

    @property
    def held(self) -> int:
        """Rows the lane holds: waiting and in flight."""
        return len(self.waiting) + self.in_flight

    def mark_gone(self, reason: str) -> None:
        self.gone = reason
        self.gone_at = time.time()

    def refresh(self, claim: DeliveryClaim) -> None:
        """Catch up with changes a person made to the webhook since the lane last saw it."""
        self.updated_at = claim.webhook_updated_at
        if (
            self.gone is not None
            and claim.webhook_status == "published"
            and claim.webhook_updated_at > self.gone_at
        ):
            self.gone = None
        if claim.url != self.url:
            # A new address is a new receiver: what was learned about the old one is void.
            if self.url:
                self.breaker = CircuitBreaker(self.breaker_settings)
                self.latency = None
            self.url = claim.url
        if claim.webhook_status != self.status:
            # A person paused, archived or re-published the webhook: its rows are to end as
            # the new status says, or go out afresh, not wait out the old cool-down.
            if self.status:
                self.breaker = CircuitBreaker(self.breaker_settings)
            self.status = claim.webhook_status

    def oldest_age(self, mono: float) -> float:
        """How long the oldest request in flight has been running (0 when none is)."""
        # Requests are added as they start, on a monotonic clock, and a delivery is in
        # flight at most once: the first entry is the oldest (no scan per request started).
        oldest = next(iter(self.started.values()), mono)
        return mono - oldest

    def stalled(self, mono: float) -> bool:
        """Whether the receiver has stopped answering at its usual pace."""
        if not self.started:
            return False
        usual = STALL_FACTOR * (self.latency or 0.0)
        return self.oldest_age(mono) > max(STALL_SECONDS, usual)

    def observe(self, latency: float) -> None:
        if self.latency is None:
            self.latency = latency
        else:
            self.latency += LATENCY_SMOOTHING * (latency - self.latency)

    def holds_back(self, now: float, mono: float) -> bool:
        """Whether claims should leave this webhook's rows in the store for now.

        So it is while the breaker cools down, while the half-open breaker has its probe
        (in flight or waiting), and while the lane is stalled: rows claimed for it would
        only be handed back, and held meanwhile they take room the other lanes need.
        """
        open_until = self.breaker.open_until
        if open_until is not None and (
            now < open_until or self.breaker.probing or bool(self.waiting)
        ):
            return True
        return self.stalled(mono)

    def cap(self, per_webhook: int, now: float) -> int:
        return 1 if self.breaker.is_half_open(now) else per_webhook

    def suspect(self, mono: float) -> bool:
        """Whether the receiver is not known to answer: no answer yet, its last requests
        failed, or its oldest request has run far longer than it usually takes."""
        return self.latency is None or self.breaker.failures > 0 or self.stalled(mono)

    @property
    def untried(self) -> bool:
        """Whether the lane has yet to make its first request (none answered, none out)."""
        return self.latency is None and self.in_flight == 0 and self.breaker.failures == 0

    @property
    def idle(self) -> bool:
        return not self.waiting and self.in_flight == 0 and self.breaker.open_until is None


class Dispatcher:
    """Delivers due deliveries from the store; ``start()`` it, then ``stop()`` it.

    ``batch_size`` is how many rows one claim leases (by default twice the global
    concurrency, within 16 to 500); ``drain_timeout`` how long ``stop()`` lets requests in
    flight finish before cancelling them; ``idle_timeout`` the longest sleep without a
    wake-up. On SQLite, which one dispatcher uses alone, start-up makes rows leased by a
    previous process due at once (``release_leases_at_start``). ``suspect_share`` is the
    share of the slots that receivers not known to answer may hold (``SUSPECT_SHARE``).
    ``journal`` names this dispatcher's outcome journal (``store/journal.py``), a path no
    other process uses: start-up records what it holds, then keeps it.
    """

    def __init__(
        self,
        resources: Resources,
        *,
        batch_size: int | None = None,
        breaker: BreakerSettings | None = None,
        policy: RetryPolicy | None = None,
        drain_timeout: float = 5.0,
        idle_timeout: float = MAX_IDLE_SECONDS,
        release_leases_at_start: bool | None = None,
        retention: bool = True,
        suspect_share: float = SUSPECT_SHARE,
        journal: str | None = None,
    ) -> None:
        settings: Settings = resources.settings
        self._r = resources
        self._db = resources.database
        self._settings = settings
        self._policy = policy or RetryPolicy.from_settings(settings)
        self._breaker = breaker or BreakerSettings()
        #: This dispatcher's name on the rows it leases.
        self.owner = new_id("dsp")
        self._max = settings.max_concurrency
        self._per_webhook = settings.per_webhook_concurrency
        self._lease = settings.lease_seconds
        self._claim_outage = OutageLog(log, "claiming deliveries")
        self._flush_outage = OutageLog(log, "recording delivery outcomes")
        #: How long a held row may wait and still be started: its lease must cover the whole
        #: request and a margin. Settings from the environment leave at least one margin;
        #: settings built otherwise (tests) never less than that either.
        self._start_within = max(
            self._lease - settings.request_timeout - LEASE_MARGIN_SECONDS, LEASE_MARGIN_SECONDS
        )
        self._batch = batch_size or max(16, min(500, 2 * self._max))
        # Rows held in memory (waiting or in flight), room promised to publishing leases
        # included: enough that senders never starve while a claim and a publishing
        # transaction's lease are both on their way, no more. With room for one batch only,
        # a lease in progress kept the claim loop waiting while the slots emptied.
        self._buffer_limit = self._max + 2 * self._batch
        self._min_claim = max(1, self._batch // 4)
        # No quota when one lane may fill the whole buffer anyway.
        self._lane_limit = LANE_HOLD_FACTOR * self._per_webhook
        self._quota_bound = self._lane_limit < self._buffer_limit
        self._drain_timeout = drain_timeout
        self._idle_timeout = idle_timeout
        self._release_at_start = (
            self._db.is_sqlite if release_leases_at_start is None else release_leases_at_start
        )
        self._backlog = BacklogWatch(self._db)
        self._indexing = IndexTask(self._db) if self._db.is_sqlite else None
        self._retention = (
            RetentionTask(self._db, settings.retention_days)
            if retention and settings.retention_days > 0
            else None
        )

        # Replicas sharing a PostgreSQL database hear of each other's new work at once.
        self._listener = (
            None if self._db.is_sqlite else DueListener(self._db.url, resources.wake_dispatcher)
        )

        self._lanes: dict[str, _Lane] = {}
        #: Lanes with rows to start, in turn: those of receivers that answer, and those of
        #: receivers not known to answer (as each was when it became ready), apart, so that
        #: either kind finds its own slots without a walk past the other.
        self._ready: deque[str] = deque()
        self._ready_suspect: deque[str] = deque()
        self._ready_set: set[str] = set()
        #: Requests in flight to receivers not known to answer, and their cap. They have
        #: slots of their own, beside the ``max_concurrency`` of receivers that answer.
        self._suspect: set[str] = set()
        self._suspect_max = suspect_slots(self._max, suspect_share)
        self._untried_max = self._max - int(self._max * RESERVE_SHARE)
        #: Lanes kept from starting by that cap, made ready again whenever a request ends,
        #: and since when (monotonic) each has waited.
        self._parked: dict[str, float] = {}
        self._held = 0
        #: Room promised to leases that publishing transactions are writing for us.
        self._reserved = 0
        self._held_ids: set[str] = set()
        self._in_flight = 0
        #: Requests in flight, by delivery id: the futures of their outcomes.
        self._answers: dict[str, asyncio.Future[AttemptOutcome]] = {}
        self._results: list[DeliveryResult] = []
        self._releases: list[Release] = []
        #: Webhooks whose breaker opened: their rows in the store wait out the cool-down.
        self._holds: dict[str, float] = {}
        #: The webhooks claims leave out that are cooling down (breaker open), with when each
        #: cool-down ends (Unix seconds), as the last ``_excluded`` found them.
        self._cooling: dict[str, float] = {}
        self._journal_prefix = journal
        self._journal: OutcomeJournal | None = None
        #: Whether the store would not take some outcomes at shutdown.
        self._left_unrecorded = False
        self._flush_wanted = asyncio.Event()
        self._waiting_for_room = False
        self._stopping = False
        self._closing = False
        self._claim_task: asyncio.Task[None] | None = None
        self._flush_task: asyncio.Task[None] | None = None

    # -- life cycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Start claiming and delivering; idempotent."""
        if self._claim_task is not None:
            return
        await self._r.sender.start()
        if self._journal_prefix is not None:
            await self._replay_journal(self._journal_prefix)
            self._journal = OutcomeJournal(self._journal_prefix, self.owner)
        if self._release_at_start:
            released = await self._db.run(outbox.release_stale_leases, time.time())
            if released:
                log.info("made %d deliveries leased before a restart due again", released)
        self._stopping = self._closing = False
        self._left_unrecorded = False
        self._flush_task = asyncio.create_task(self._flush_loop(), name="webhooks-flush")
        self._claim_task = asyncio.create_task(self._claim_loop(), name="webhooks-claim")
        if self._retention is not None:
            self._retention.start()
        if self._indexing is not None:
            self._indexing.start()
        self._backlog.start()
        if self._listener is not None:
            self._listener.start()
        self._r.claimer = self

    def problem(self) -> str | None:
        """What keeps this dispatcher from delivering now, in a sentence; None when nothing
        does (for health probes, which may ask from another thread)."""
        task = self._claim_task
        if task is None or task.done():
            return "The dispatcher is not running."
        if self._claim_outage.ongoing or self._flush_outage.ongoing:
            return "The store is unavailable; deliveries wait until it is back."
        return None

    async def stop(self) -> None:
        """Stop claiming, hand back or finish what is held, and write every outcome."""
        claim_task, self._claim_task = self._claim_task, None
        if claim_task is None:
            return
        self._stopping = True
        if self._r.claimer is self:
            self._r.claimer = None
        self._r.wake_dispatcher()
        # The loop notices the flag after its current step; a claim in progress completes,
        # so its rows are in hand and can be handed back below.
        with contextlib.suppress(asyncio.CancelledError):
            await claim_task
        if self._retention is not None:
            await self._retention.stop()
        if self._indexing is not None:
            await self._indexing.stop()
        await self._backlog.stop()
        if self._listener is not None:
            await self._listener.stop()

        now = time.time()
        for lane in self._lanes.values():
            while lane.waiting:
                self._release(lane.waiting.popleft().claim, now)
        in_flight = list(self._answers.values())
        if in_flight:
            _done, pending = await asyncio.wait(in_flight, timeout=self._drain_timeout)
            for answer in pending:
                # Its ``_answered`` (registered first) runs before ``gather`` sees it end:
                # every request cut off is recorded before the flush below.
                answer.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

        self._closing = True
        self._flush_wanted.set()
        flush_task, self._flush_task = self._flush_task, None
        if flush_task is not None:
            await flush_task
        journal, self._journal = self._journal, None
        if journal is not None:
            # Outcomes the store could not take stay in the journal for the next start.
            journal.close(keep=self._left_unrecorded)

    async def _replay_journal(self, prefix: str) -> None:
        """Record the outcomes a process before this one knew but had not written."""
        entries = await asyncio.to_thread(read_journal, prefix)
        if entries:
            recorded = await self._db.run_driver(
                outbox.replay_outcomes,
                entries,
                time.time(),
                self._settings.disable_after_seconds,
                relaxed=True,
            )
            log.info(
                "recorded %d delivery outcomes the process before had not written "
                "(%d in its journal)",
                recorded,
                len(entries),
            )
        await asyncio.to_thread(remove_journal, prefix)

    # -- claiming ------------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        work = self._r.work_available
        while not self._stopping:
            # Cleared before claiming: a publish that commits after this point sets it
            # again, so the wait below can never sleep through new work.
            work.clear()
            now, mono = time.time(), time.monotonic()
            self._check_lanes(now, mono)
            room = self._buffer_limit - self._held - self._reserved
            want = min(self._batch, room)
            next_due: float | None = None
            self._waiting_for_room = want < self._min_claim and self._held > 0
            if not self._waiting_for_room and want > 0:
                excluded = self._excluded(now, mono)
                try:
                    claims, next_due = await self._db.run_driver(
                        self._claim, want, excluded, self._quota(), relaxed=True
                    )
                    self._claim_outage.succeeded()
                except Exception as error:
                    self._claim_outage.failed(error)
                    claims, next_due = [], time.time() + min(self._idle_timeout, 1.0)
                self._take(claims)
                if len(claims) == want and not self._stopping:
                    continue
            if self._stopping:
                break
            await self._idle(work, next_due)

    # -- rows leased by publishing transactions (store/publish_queue.py) ---------------------

    def lease_request(self) -> outbox.Lease | None:
        """The lease a publishing transaction may write new rows with; None without room."""
        if self._stopping or self._claim_task is None:
            return None
        want = min(self._batch, self._buffer_limit - self._held - self._reserved)
        if want < 1:
            return None
        self._reserved += want
        now = time.time()
        excluded = self._excluded(now, time.monotonic())
        return outbox.Lease(
            owner=self.owner,
            until=now + self._lease,
            limit=want,
            excluded=excluded,
            quota=self._quota(),
            held_until=self._cooling,
        )

    def admit_leased(self, lease: outbox.Lease, claims: list[DeliveryClaim]) -> None:
        """Take the rows a committed publishing transaction leased to us."""
        self._reserved -= lease.limit
        if not claims:
            return
        if self._stopping:
            now = time.time()
            for claim in claims:
                self._queue_release(claim.delivery_id, now)
            return
        self._take(claims)

    def _take(self, claims: list[DeliveryClaim]) -> None:
        """Put freshly leased rows into their lanes and start what may start."""
        if not claims:
            return
        now, mono = time.time(), time.monotonic()
        # Rows a stalled lane hands back are spread out in time, not all due at once.
        overflow: dict[str, int] = {}
        for claim in claims:
            self._admit(claim, now, mono, overflow)
        self._pump()

    def lease_abandoned(self, lease: outbox.Lease) -> None:
        """The publishing transaction failed; nothing was leased."""
        self._reserved -= lease.limit

    def _claim(
        self,
        session: Transaction,
        want: int,
        excluded: dict[str, float],
        quota: outbox.Quota | None,
    ) -> tuple[list[DeliveryClaim], float | None]:
        now = time.time()
        claims = outbox.claim_due(
            session, self.owner, now, self._lease, want, excluded=excluded, quota=quota
        )
        next_due = outbox.next_due_time(session, excluded) if len(claims) < want else None
        if not claims and next_due is not None and next_due <= now:
            # Due rows are there, but only of lanes holding their share: a lane that drains
            # wakes the loop, so waiting for that (or the idle timeout) loses nothing.
            next_due = None
        return claims, next_due

    def _quota(self) -> outbox.Quota | None:
        """Each webhook's room for rows: its lane's share less what the lane holds."""
        if not self._quota_bound:
            return None
        return outbox.Quota(
            self._lane_limit,
            {webhook_id: lane.held for webhook_id, lane in self._lanes.items() if lane.held},
        )

    def _excluded(self, now: float, mono: float) -> dict[str, float]:
        """The webhooks whose rows the next claim leaves in the store (``holds_back``, and
        receivers not known to answer while those have all their slots).

        Each with the ``updated_at`` its lane saw: once a person changes the webhook, its
        rows are claimed again, so the lane learns of a new address or status.
        """
        excluded: dict[str, float] = {}
        cooling: dict[str, float] = {}
        # Receivers not known to answer have all the slots they may have: rows claimed for
        # them would only wait.
        suspects_full = len(self._suspect) >= self._suspect_max
        for webhook_id, lane in self._lanes.items():
            if lane.idle:
                continue
            lane.full = self._quota_bound and lane.held >= self._lane_limit
            if not (
                lane.full
                or lane.holds_back(now, mono)
                or webhook_id in self._parked
                or (suspects_full and lane.suspect(mono))
            ):
                continue
            excluded[webhook_id] = lane.updated_at
            if lane.breaker.is_open(now):
                assert lane.breaker.open_until is not None
                cooling[webhook_id] = lane.breaker.open_until
        self._cooling = cooling
        return excluded

    async def _idle(self, work: asyncio.Event, next_due: float | None) -> None:
        timeout = self._idle_timeout
        if not self._waiting_for_room:
            # Due times matter only to a dispatcher with room to claim; without room, the
            # request that frees it wakes the loop.
            if next_due is not None:
                timeout = min(timeout, max(0.0, next_due - time.time()))
            if self._cooling:
                # Rows a claim left out come due for it when their webhook's cool-down ends.
                cool_down_ends = min(self._cooling.values())
                timeout = min(timeout, max(0.0, cool_down_ends - time.time()))
        if any(lane.waiting for lane in self._lanes.values()):
            timeout = min(timeout, LANE_CHECK_SECONDS)
        if timeout <= 0:
            # Claim again at once, but only after the event loop's other work has run.
            await asyncio.sleep(0)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(work.wait(), timeout)

    def _admit(
        self, claim: DeliveryClaim, now: float, mono: float, overflow: dict[str, int]
    ) -> None:
        if claim.delivery_id in self._held_ids:
            # Its lease ran out while we held it and we claimed it again: keep one copy.
            return
        lane = self._lanes.get(claim.webhook_id)
        if lane is None:
            lane = self._lanes[claim.webhook_id] = _Lane(self._breaker)
        lane.last_used = mono
        lane.refresh(claim)
        unsent = self._unsendable(claim, lane)
        if unsent is not None:
            self._queue_result(unsent)
            return
        if lane.breaker.is_open(now):
            assert lane.breaker.open_until is not None
            self._queue_release(claim.delivery_id, lane.breaker.open_until)
            return
        if lane.breaker.is_half_open(now) and (lane.breaker.probing or lane.waiting):
            # One probe at a time: the lane has its probe, so the row goes back unsent,
            # and claims leave the webhook's rows alone until the probe has answered.
            self._queue_release(claim.delivery_id, now)
            return
        if lane.stalled(mono):
            position = overflow.get(claim.webhook_id, 0)
            overflow[claim.webhook_id] = position + 1
            self._queue_release(claim.delivery_id, now + self._defer_delay(lane, position, mono))
            return
        lane.waiting.append(_Held(claim, mono))
        self._held += 1
        self._held_ids.add(claim.delivery_id)
        self._mark_ready(claim.webhook_id)

    def _unsendable(self, claim: DeliveryClaim, lane: _Lane) -> DeliveryResult | None:
        """The result for a row that must not be sent, or None when it may go."""

        def finish(state: DeliveryState, error: str = "", skip: str = "") -> DeliveryResult:
            return DeliveryResult(
                delivery_id=claim.delivery_id,
                webhook_id=claim.webhook_id,
                status=state,
                attempt_count=claim.attempt_count,
                last_error=error,
                skip_reason=skip,
            )

        if lane.gone is not None or claim.webhook_status == "disabled":
            return finish(
                DeliveryState.FAILED,
                error=outbox.disabled_error(lane.gone or claim.disabled_reason),
            )
        if claim.webhook_status != "published":
            return finish(
                DeliveryState.SKIPPED,
                skip=f"The webhook was {claim.webhook_status} when the delivery was due, "
                "so it was not sent.",
            )
        if not tier_allows_webhooks(claim.tier):
            return finish(DeliveryState.SKIPPED, skip=outbox.tier_skip_reason(claim.tier))
        return None

    def _defer_delay(self, lane: _Lane, position: int, mono: float) -> float:
        """How long a row handed back by a stalled lane waits.

        As long as the lane has hung so far, spread out by the row's place in line, so the
        rows come back one after another rather than all at once; at most one lease.
        """
        stalled_for = max(lane.oldest_age(mono), MIN_DEFER_SECONDS)
        spread = position * stalled_for / max(1, self._per_webhook)
        return min(stalled_for + spread, self._lease)

    def _check_lanes(self, now: float, mono: float) -> None:
        """Hand back rows that lanes cannot send in time; forget lanes long idle."""
        # Rows must leave well before their lease ends, or another dispatcher may claim them.
        stale_after = min(self._lease / 2, self._start_within)
        for webhook_id, lane in list(self._lanes.items()):
            if lane.idle:
                self._parked.pop(webhook_id, None)
                if mono - lane.last_used > LANE_IDLE_SECONDS:
                    del self._lanes[webhook_id]
                continue
            if not lane.waiting:
                continue
            if self._empty_if_unsendable(lane, now):
                continue
            parked_since = self._parked.get(webhook_id)
            if lane.stalled(mono) or (
                parked_since is not None and mono - parked_since > STALL_SECONDS
            ):
                # Stalled, or kept waiting for the slots receivers not known to answer may
                # use: its rows would take the room other lanes' claims need.
                self._parked.pop(webhook_id, None)
                position = 0
                while lane.waiting:
                    held = lane.waiting.popleft()
                    self._release(held.claim, now + self._defer_delay(lane, position, mono))
                    position += 1
                continue
            while lane.waiting and mono - lane.waiting[0].claimed_at > stale_after:
                held = lane.waiting.popleft()
                self._release(held.claim, now + MIN_DEFER_SECONDS)

    # -- sending -----------------------------------------------------------------------------

    def _mark_ready(self, webhook_id: str) -> None:
        if webhook_id not in self._ready_set:
            self._ready_set.add(webhook_id)
            lane = self._lanes.get(webhook_id)
            if lane is not None and lane.suspect(time.monotonic()):
                self._ready_suspect.append(webhook_id)
            else:
                self._ready.append(webhook_id)

    def _pump(self) -> None:
        """Start requests while slots are free, one lane after another in turn.

        Receivers that answer have ``max_concurrency`` slots; receivers not known to answer
        have ``suspect_slots`` of their own (a new webhook's first request may also take one
        of the others while ``RESERVE_SHARE`` of them stays free).
        """
        if self._stopping:
            return
        now, mono = time.time(), time.monotonic()
        while True:
            suspects = len(self._suspect)
            # Requests not counted as suspect take the slots of receivers that answer.
            answering = self._in_flight - suspects
            if answering < self._max and self._ready:
                queue = self._ready
            elif self._ready_suspect and (
                suspects < self._suspect_max or answering < self._untried_max
            ):
                queue = self._ready_suspect
            else:
                break
            webhook_id = queue.popleft()
            self._ready_set.discard(webhook_id)
            lane = self._lanes.get(webhook_id)
            if lane is None or not lane.waiting:
                continue
            if self._empty_if_unsendable(lane, now):
                continue
            if lane.in_flight >= lane.cap(self._per_webhook, now) or not lane.breaker.may_start(
                now
            ):
                # The lane is at its cap; it becomes ready again when a request ends.
                continue
            if lane.suspect(mono):
                suspect = suspects < self._suspect_max
                if not suspect and not (lane.untried and answering < self._untried_max):
                    if lane.untried:
                        # A lane yet to make its first request (its address just changed)
                        # may also take a slot of receivers that answer: it waits in line.
                        self._mark_ready(webhook_id)
                    else:
                        # Ready again when a slot of receivers not known to answer frees.
                        self._parked.setdefault(webhook_id, mono)
                    continue
            elif answering >= self._max:
                # It answers now, but every slot of receivers that answer is taken.
                self._mark_ready(webhook_id)
                continue
            else:
                suspect = False
            held = lane.waiting.popleft()
            if time.monotonic() - held.claimed_at > self._start_within:
                # Its lease could run out before the answer: another dispatcher might send
                # it meanwhile. Due again at once, it comes back with a fresh lease.
                self._release(held.claim, now)
            else:
                self._start(lane, held.claim, now, suspect=suspect)
            if lane.waiting:
                self._mark_ready(webhook_id)

    def _empty_if_unsendable(self, lane: _Lane, now: float) -> bool:
        """Empty a lane that may not send now: its webhook was just disabled (its rows fail)
        or its breaker is open (its rows wait out the cool-down in the store)."""
        if lane.gone is not None:
            self._fail_waiting(lane)
            return True
        open_until = lane.breaker.open_until
        if lane.breaker.is_open(now) and open_until is not None:
            while lane.waiting:
                self._release(lane.waiting.popleft().claim, open_until)
            return True
        return False

    def _fail_waiting(self, lane: _Lane) -> None:
        """Finish, unsent, the rows of a lane whose webhook this process just disabled."""
        while lane.waiting:
            claim = lane.waiting.popleft().claim
            self._held -= 1
            self._held_ids.discard(claim.delivery_id)
            result = self._unsendable(claim, lane)
            assert result is not None  # lane.gone makes every row unsendable
            self._queue_result(result)

    def _start(self, lane: _Lane, claim: DeliveryClaim, now: float, *, suspect: bool) -> None:
        """Send ``claim``; ``suspect`` when it takes a slot of receivers not known to answer."""
        lane.in_flight += 1
        self._in_flight += 1
        metrics.STATS.in_flight += 1
        lane.breaker.started(now)
        if self._parked:
            self._parked.pop(claim.webhook_id, None)
        mono = time.monotonic()
        if suspect:
            self._suspect.add(claim.delivery_id)
        lane.started[claim.delivery_id] = mono
        request = OutboundRequest(
            url=claim.url,
            body=claim.body,
            event_type=claim.event_type,
            event_id=claim.event_id,
            delivery_id=claim.delivery_id,
            secrets=claim.secrets(now),
        )
        # The outcome comes back as a future and a callback takes it: with sender
        # processes, a request costs no task and no coroutine here.
        answer = self._r.sender.submit(request)
        self._answers[claim.delivery_id] = answer
        answer.add_done_callback(functools.partial(self._answered, lane, claim))

    def _answered(
        self, lane: _Lane, claim: DeliveryClaim, answer: asyncio.Future[AttemptOutcome]
    ) -> None:
        """The request ``_start`` made has ended: answered, failed, or cut off by ``stop``."""
        del self._answers[claim.delivery_id]
        if answer.cancelled():
            # Stopping: the receiver may or may not have the request; sending it again
            # after the restart keeps the promise of at least once. The request cut off is
            # an attempt of its own in the log, as every request made is.
            self._queue_result(self._cut_off(lane, claim))
            self._request_ended(lane, claim, None)
            return
        error = answer.exception()
        if error is not None:
            log.error("sending delivery %s failed unexpectedly", claim.delivery_id, exc_info=error)
            self._queue_release(claim.delivery_id, time.time() + MIN_DEFER_SECONDS)
        outcome = None if error is not None else answer.result()
        self._request_ended(lane, claim, outcome)
        self._take_outcome(lane, claim, outcome)

    def _request_ended(
        self, lane: _Lane, claim: DeliveryClaim, outcome: AttemptOutcome | None
    ) -> None:
        """Free the slot of ``claim``'s request, with or without an ``outcome``."""
        if outcome is None or outcome.lost:
            # No verdict on the receiver: a half-open breaker may send another probe.
            lane.breaker.abandoned()
        lane.in_flight -= 1
        lane.started.pop(claim.delivery_id, None)
        lane.last_used = time.monotonic()
        if claim.delivery_id in self._suspect:
            self._suspect.discard(claim.delivery_id)
            # Parked lanes wait for a slot of receivers not known to answer, and now one is
            # free. Waking them at every answer instead cost each delivery a turn of the
            # pump per lane kept waiting.
            for parked in self._parked:
                self._mark_ready(parked)
        self._in_flight -= 1
        metrics.STATS.in_flight -= 1
        self._held -= 1
        self._held_ids.discard(claim.delivery_id)
        if lane.waiting:
            self._mark_ready(claim.webhook_id)
        if lane.full and lane.held <= self._lane_limit // 2:
            # Claims left its rows in the store; now it has room for a good share again.
            lane.full = False
            self._r.wake_dispatcher()

    def _take_outcome(
        self, lane: _Lane, claim: DeliveryClaim, outcome: AttemptOutcome | None
    ) -> None:
        """Judge ``outcome`` (None: the request failed in this process) and start what may."""
        if outcome is not None:
            self._queue_result(self._judge(lane, claim, outcome))
        self._pump()
        if self._waiting_for_room and self._buffer_limit - self._held >= self._min_claim:
            self._waiting_for_room = False
            self._r.wake_dispatcher()

    def _judge(self, lane: _Lane, claim: DeliveryClaim, last: AttemptOutcome) -> DeliveryResult:
        """Turn an attempt's outcome into the delivery's new state."""
        now = time.time()
        # ``attempt_count`` counts slots of the schedule; attempts lost for free take none, so
        # this attempt's number in the log also counts the delivery's earlier losses.
        lost = claim.lost_attempts
        free_loss = last.lost and lost < LOST_RETRIES
        count = claim.attempt_count + (0 if free_loss else 1)
        number = claim.attempt_count + lost + 1
        attempt = AttemptRecord(
            number=number,
            attempted_at=last.attempted_at.timestamp(),
            status_code=last.status_code,
            latency_ms=last.latency * 1000.0,
            response_body=last.response_body,
            error=last.error,
            success=last.success,
            lost=last.lost,
        )
        if last.lost:
            # A lost attempt tells nothing of the receiver: its breaker and latency stay.
            metrics.STATS.attempts_lost += 1
        else:
            metrics.STATS.attempt(last.success, last.latency)
            lane.observe(last.latency)
            self._update_breaker(lane, claim, last, now)

        def result(
            state: DeliveryState, *, due: float | None = None, disable: str | None = None
        ) -> DeliveryResult:
            return DeliveryResult(
                delivery_id=claim.delivery_id,
                webhook_id=claim.webhook_id,
                status=state,
                attempt_count=count,
                next_attempt_at=due,
                attempts=(attempt,),
                last_error=last.error,
                disable_reason=disable,
                lost_attempts=lost + (1 if free_loss else 0),
            )

        if last.success:
            return result(DeliveryState.SUCCEEDED)
        if last.permanent_gone:
            lane.mark_gone(GONE_REASON)
            self._log_given_up(claim, number, last)
            return result(DeliveryState.FAILED, disable=GONE_REASON)
        if free_loss:
            # The receiver may or may not have the request: it goes again soon, at least once.
            return result(DeliveryState.PENDING, due=now + LOST_RETRY_SECONDS)
        due = self._policy.next_attempt_at(count, last, now)
        if due is None:
            self._log_given_up(claim, number, last)
            return result(DeliveryState.FAILED)
        return result(DeliveryState.PENDING, due=due)

    def _update_breaker(
        self, lane: _Lane, claim: DeliveryClaim, last: AttemptOutcome, now: float
    ) -> None:
        """Count an answer (or its absence) on the webhook's breaker; say so if it opens."""
        was_open_until = lane.breaker.open_until
        lane.breaker.record(alive=last.success or not trips_breaker(last), now=now)
        open_until = lane.breaker.open_until
        if open_until is None and was_open_until is not None:
            log.info("webhook %s answers again; its held deliveries go out", claim.webhook_id)
        if open_until is not None and open_until != was_open_until:
            # Said once per outage: a probe failing again is the same news, and a receiver
            # behind hundreds of webhooks would otherwise fill the log with it.
            log.log(
                logging.WARNING if lane.breaker.openings == 1 else logging.DEBUG,
                "webhook %s keeps failing (last: %s); holding its deliveries back for %.0f s",
                claim.webhook_id,
                last.error.rstrip(".") or f"status {last.status_code}",
                max(0.0, open_until - now),
            )
            # The breaker opened: the webhook's rows in the store wait out the cool-down
            # there, rather than being claimed only to be handed back.
            self._holds[claim.webhook_id] = max(open_until, self._holds.get(claim.webhook_id, 0))

    @staticmethod
    def _log_given_up(claim: DeliveryClaim, count: int, last: AttemptOutcome) -> None:
        """One line for a delivery that failed for good; rare, so it costs the hot path nothing.

        It names the delivery, its event type, the webhook and the last error as the delivery
        log shows it; never the secret or the body.
        """
        log.warning(
            "delivery %s of %s to webhook %s failed for good after %d attempt%s (last: %s)",
            claim.delivery_id,
            claim.event_type,
            claim.webhook_id,
            count,
            "" if count == 1 else "s",
            last.error.rstrip(".") or f"status {last.status_code}",
        )

    def _cut_off(self, lane: _Lane, claim: DeliveryClaim) -> DeliveryResult:
        """A request that stopping cut off: logged without an answer, due again at once."""
        now, mono = time.time(), time.monotonic()
        elapsed = mono - lane.started.get(claim.delivery_id, mono)
        attempt = AttemptRecord(
            number=claim.attempt_count + claim.lost_attempts + 1,
            attempted_at=now - elapsed,
            status_code=None,
            latency_ms=elapsed * 1000.0,
            response_body="",
            error=CUT_OFF_ERROR,
            success=False,
            lost=True,
        )
        metrics.STATS.attempts_lost += 1
        return DeliveryResult(
            delivery_id=claim.delivery_id,
            webhook_id=claim.webhook_id,
            status=DeliveryState.PENDING,
            attempt_count=claim.attempt_count + 1,
            next_attempt_at=now,
            attempts=(attempt,),
            last_error=CUT_OFF_ERROR,
            lost_attempts=claim.lost_attempts,
        )

    # -- recording ---------------------------------------------------------------------------

    def _release(self, claim: DeliveryClaim, due: float) -> None:
        """Hand back a row held in memory (not in flight)."""
        self._held -= 1
        self._held_ids.discard(claim.delivery_id)
        self._queue_release(claim.delivery_id, due)

    def _queue_release(self, delivery_id: str, due: float) -> None:
        self._releases.append(Release(delivery_id, due))
        self._flush_wanted.set()

    def _queue_result(self, result: DeliveryResult) -> None:
        if result.status is not DeliveryState.PENDING:
            metrics.STATS.finished[result.status.value] += 1
        self._results.append(result)
        journal = self._journal
        if journal is not None and result.attempts:
            if not journal.has_pending:
                # One write for every outcome that comes in this turn of the event loop.
                asyncio.get_running_loop().call_soon(journal.write)
            journal.append(result)
        self._flush_wanted.set()

    async def _flush_loop(self) -> None:
        while True:
            await self._flush_wanted.wait()
            self._flush_wanted.clear()
            if not self._closing and len(self._results) + len(self._releases) < FLUSH_BATCH:
                # A moment's wait lets outcomes that finish together share one transaction;
                # receivers have their requests already, so nobody waits on this but the log.
                await asyncio.sleep(FLUSH_WINDOW_SECONDS)
            await self._flush()
            if self._closing and not self._results and not self._releases and not self._holds:
                return

    async def _flush(self) -> None:
        """Write what has gathered; keep writing only while full batches wait (or closing)."""
        failures = 0
        while self._results or self._releases or self._holds:
            # Outcomes up to here are in this write: a full segment of the journal holding
            # them is sealed now and deleted once the write commits.
            sealed = None if self._journal is None else self._journal.mark()
            results, self._results = self._results, []
            releases, self._releases = self._releases, []
            holds, self._holds = self._holds, {}
            try:
                await self._record(results, releases, holds)
                if sealed is not None and self._journal is not None:
                    self._journal.committed(sealed)
                self._flush_outage.succeeded()
            except Exception as error:
                failures += 1
                unavailable = store_unavailable(error)
                if (
                    failures >= SPLIT_AFTER_FAILURES
                    and not unavailable
                    and len(results) + len(releases) > 1
                ):
                    # The same outcomes keep failing: one that cannot be written must not
                    # hold back the others, so each is written on its own.
                    log.exception(
                        "recording %d outcomes failed %d times; recording them one by one",
                        len(results) + len(releases),
                        failures,
                    )
                    if await self._record_each(results, releases, holds):
                        failures = 0
                        continue
                if self._closing and failures >= SPLIT_AFTER_FAILURES:
                    log.exception(
                        "could not record %d outcomes at shutdown; %s",
                        len(results) + len(releases),
                        "their leases will run out"
                        if self._journal is None or self._journal.broken
                        else "the next start records them from the journal",
                    )
                    # So ``stop`` leaves them in the journal for the next start.
                    self._left_unrecorded = True
                    return
                self._flush_outage.failed(error)
                self._results[:0] = results
                self._releases[:0] = releases
                for webhook_id, until in holds.items():
                    self._holds[webhook_id] = max(until, self._holds.get(webhook_id, 0))
                await asyncio.sleep(min(5.0, 0.2 * 2**failures))
                continue
            failures = 0
            if not self._closing and len(self._results) + len(self._releases) < FLUSH_BATCH:
                # What finished during this write waits for the next window, with company.
                return

    async def _record(
        self, results: list[DeliveryResult], releases: list[Release], holds: dict[str, float]
    ) -> None:
        """Write outcomes, releases and hold-backs in one transaction, then act on its effects."""
        effects = await self._db.run_driver(
            outbox.record_results,
            self.owner,
            results,
            releases,
            time.time(),
            self._settings.disable_after_seconds,
            [HoldBack(webhook_id, until) for webhook_id, until in holds.items()],
            relaxed=True,
        )
        if effects.stale:
            log.warning(
                "%d outcomes were not recorded: their delivery's lease had passed to another "
                "dispatcher",
                effects.stale,
            )
        if effects.gone:
            # Deleted with their webhook or project while they were under way: as asked.
            log.debug("%d outcomes of deleted deliveries were not recorded", effects.gone)
        for webhook_id, reason in effects.disabled.items():
            log.warning("disabled webhook %s: %s", webhook_id, reason)
            lane = self._lanes.get(webhook_id)
            if lane is not None:
                lane.mark_gone(reason)
        # Retries that are due already (a zero delay) must not wait for the idle timer.
        soon = time.time() + 0.01
        if any(
            r.status is DeliveryState.PENDING
            and r.next_attempt_at is not None
            and r.next_attempt_at <= soon
            for r in results
        ) or any(r.next_attempt_at <= soon for r in releases):
            self._r.wake_dispatcher()

    async def _record_each(
        self, results: list[DeliveryResult], releases: list[Release], holds: dict[str, float]
    ) -> bool:
        """Write each outcome and release in a transaction of its own; False, with nothing
        written, when the store is failing rather than an outcome (it is unavailable, or the
        first ones all fail alike): the caller then tries the whole batch again later.

        An outcome the store refuses on its own is written again without the texts that came
        from the receiver, so its attempt still counts; one that fails even so is given up:
        its delivery keeps its lease and is sent again once the lease runs out, as after a
        crash.
        """
        singles: list[tuple[str, list[DeliveryResult], list[Release]]] = [
            (result.delivery_id, [result], []) for result in results
        ]
        singles += [(release.delivery_id, [], [release]) for release in releases]
        written = False
        failed: list[str] = []
        for index, (delivery_id, some_results, some_releases) in enumerate(singles):
            try:
                await self._record(some_results, some_releases, {})
            except Exception as error:
                if store_unavailable(error):
                    if not written:
                        return False
                    # The rest waits for the store, as a batch does.
                    for _, later_results, later_releases in singles[index:]:
                        self._results.extend(later_results)
                        self._releases.extend(later_releases)
                    break
                if some_results and await self._record_stripped(some_results[0]):
                    written = True
                    continue
                failed.append(delivery_id)
                if not written and len(failed) >= SPLIT_AFTER_FAILURES:
                    return False
            else:
                written = True
        if not written:
            return False
        for delivery_id in failed:
            log.error(
                "could not record the outcome of delivery %s; it is sent again once its lease "
                "runs out",
                delivery_id,
            )
        if holds:
            try:
                await self._record([], [], holds)
            except Exception:
                # Hold-backs only spare an unwell receiver early retries.
                log.exception("could not record %d hold-backs", len(holds))
        return True

    async def _record_stripped(self, result: DeliveryResult) -> bool:
        """Write ``result`` with its error texts and answer bodies replaced by a note (what
        a receiver sent is all an outcome holds that the store might refuse); whether it
        was written."""
        log.warning(
            "the store refused the outcome of delivery %s; recording it without the receiver's "
            "texts",
            result.delivery_id,
        )
        stripped = replace(
            result,
            last_error=UNSTORABLE_ERROR if result.last_error else "",
            attempts=tuple(
                replace(a, error=UNSTORABLE_ERROR if a.error else "", response_body="")
                for a in result.attempts
            ),
        )
        try:
            await self._record([stripped], [], {})
        except Exception:
            log.exception("could not record the outcome of delivery %s", result.delivery_id)
            return False
        return True
