"""Group commit for publishing: concurrent publish calls share one transaction.

A commit costs a disk sync, which dwarfs the work of storing one event. Calls that arrive
while a transaction is being written go in together in the next one, so under load each
sync acknowledges many calls, and an idle service still writes a lone call at once (nothing
waits for company). A call is answered only after the transaction holding its events has
committed.

The next transaction is handed to the store's thread while the current one is still being
written, and takes its calls only when it starts: the thread goes from one commit straight
to the next with every call that came meanwhile, instead of waiting for the event loop to
notice the first commit and wake it again. Each such wake-up costs about as much as the
transaction itself on a busy machine. When a transaction has committed, the store's thread
hands its answers to the event loop in one callback.

If a shared transaction fails (say one call names a project the directory does not know),
every call of the group is written again on its own, so one caller's mistake never fails
another's events.

When a dispatcher runs in the same process, the transaction writes the new deliveries
already leased to it (as much as it has room for): the dispatcher has them in hand the moment
the call is acknowledged, with no claim transaction of its own in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from dembrane.webhooks.domain.errors import InvalidArgument
from dembrane.webhooks.domain.payload import EventData, body_parts, parts_ahead
from dembrane.webhooks.store import outbox
from dembrane.webhooks.store.database import Database, Transaction

log = logging.getLogger(__name__)

#: The most events one shared transaction takes; a call is never split.
MAX_GROUP_EVENTS = 1000


class Claimer(Protocol):
    """A dispatcher in this process, to which publishing transactions lease new rows."""

    def lease_request(self) -> outbox.Lease | None:
        """The lease to write new rows with (reserving room for them), or None for none."""

    def admit_leased(self, lease: outbox.Lease, claims: list[outbox.DeliveryClaim]) -> None:
        """Take the rows a committed transaction leased; give back the room left over."""

    def lease_abandoned(self, lease: outbox.Lease) -> None:
        """The transaction failed: give back the room reserved for ``lease``."""


@dataclass
class _Call:
    events: Sequence[EventData]
    done: asyncio.Future[list[outbox.PublishOutcome]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


@dataclass
class _Write:
    """One shared transaction: handed to the store's thread, answered on the event loop."""

    claimer: Claimer | None
    lease: outbox.Lease | None
    #: The calls it took when it started (empty until then).
    group: list[_Call] = field(default_factory=list)
    published: outbox.Published = field(default_factory=outbox.Published)
    outcomes: list[outbox.PublishOutcome] = field(default_factory=list)
    error: BaseException | None = None


class PublishQueue:
    """Writes publish calls in shared transactions, one transaction at a time."""

    def __init__(
        self,
        database: Database,
        dashboard_base_url: str,
        on_stored: Callable[[], None],
        claimer: Callable[[], Claimer | None] = lambda: None,
    ) -> None:
        self._db = database
        self._dashboard_base_url = dashboard_base_url
        self._on_stored = on_stored
        self._claimer = claimer
        #: Guards ``_waiting`` and ``_write_queued``, shared with the store's thread.
        self._lock = threading.Lock()
        #: Held for a transaction: one at a time, even where the store has several threads.
        self._writing = threading.Lock()
        self._waiting: deque[_Call] = deque()
        #: Whether a transaction is handed over that has not taken its calls yet.
        self._write_queued = False
        #: Calls written again one by one after their shared transaction failed.
        self._retries: set[asyncio.Task[None]] = set()

    async def publish(self, events: Sequence[EventData]) -> list[outbox.PublishOutcome]:
        """Store ``events`` (one call's, all or nothing) and their deliveries.

        Their bodies are rendered here first, but for the project (``body_parts``, kept in
        each event's ``parts``): the store's one thread, which every publication waits for,
        then only adds the project's object.
        """
        base = self._dashboard_base_url
        for event in events:
            if parts_ahead(event, base) is None:
                try:
                    event.parts = body_parts(event, base)
                except InvalidArgument:
                    # Refused inside the transaction, with the call's other events.
                    event.parts = None
        call = _Call(events)
        with self._lock:
            self._waiting.append(call)
            hand_over = self._needs_hand_over()
        if hand_over:
            self._hand_over(asyncio.get_running_loop())
        # A caller that goes away cancels only its own answer: its events are written all the
        # same (they may be in the transaction under way). Not shielded, which would cost
        # the answer one more turn of the event loop.
        return await call.done

    def _hand_over(self, loop: asyncio.AbstractEventLoop) -> None:
        """Give the store's thread a transaction for the calls waiting when it starts."""
        claimer = self._claimer()
        write = _Write(claimer, None if claimer is None else claimer.lease_request())
        try:
            self._db.submit(self._write_on_store_thread, write, loop)
        except RuntimeError as error:  # the store is closed: the service is stopping
            write.group = self._take_group()
            write.error = error
            self._written(write)

    def _needs_hand_over(self) -> bool:
        """Whether calls wait with no transaction handed over for them; if so, the caller
        hands one over now (hold ``_lock``)."""
        hand_over = bool(self._waiting) and not self._write_queued
        self._write_queued |= hand_over
        return hand_over

    def _take_group(self) -> list[_Call]:
        """The calls of the next transaction; later ones wait for another."""
        group: list[_Call] = []
        total = 0
        with self._lock:
            while self._waiting:
                size = len(self._waiting[0].events)
                if group and total + size > MAX_GROUP_EVENTS:
                    break
                group.append(self._waiting.popleft())
                total += size
            self._write_queued = False
        return group

    def _write_on_store_thread(self, write: _Write, loop: asyncio.AbstractEventLoop) -> None:
        try:
            with self._writing:
                write.group = self._take_group()
                events = [event for call in write.group for event in call.events]
                if events:
                    write.outcomes = self._db.call_driver(
                        self._store, events, write.lease, write.published
                    )
        except BaseException as error:  # answered on the event loop, like a result
            write.error = error
        # A closed event loop has nobody left to answer.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._written, write)

    def _written(self, write: _Write) -> None:
        """Answer the calls of a finished transaction (on the event loop)."""
        claimer, lease = write.claimer, write.lease
        if write.error is not None:
            if claimer is not None and lease is not None:
                claimer.lease_abandoned(lease)
            if write.group:
                retry = asyncio.get_running_loop().create_task(
                    self._write_each(write.group), name="webhooks-publish-each"
                )
                self._retries.add(retry)
                retry.add_done_callback(self._retries.discard)
        else:
            try:
                if claimer is not None and lease is not None:
                    claimer.admit_leased(lease, write.published.claims)
                if lease is None or write.published.left_due > write.published.left_out:
                    # Rows the dispatcher did not take, and would not leave in a claim.
                    self._stored(write.outcomes)
            except Exception:
                # The events are stored: their callers hear so all the same, and rows the
                # dispatcher did not take are sent once their lease runs out.
                log.exception(
                    "handing %d new deliveries to the dispatcher failed",
                    len(write.published.claims),
                )
            start = 0
            for call in write.group:
                end = start + len(call.events)
                if not call.done.done():
                    call.done.set_result(write.outcomes[start:end])
                start = end
        with self._lock:
            hand_over = self._needs_hand_over()
        if hand_over:
            # Calls beyond the last transaction's limit: the next one takes them.
            self._hand_over(asyncio.get_running_loop())

    async def _write_each(self, group: list[_Call]) -> None:
        for call in group:
            try:
                outcomes = await self._db.run_driver(self._store, list(call.events))
            except Exception as error:
                if not call.done.done():
                    call.done.set_exception(error)
                continue
            self._stored(outcomes)
            if not call.done.done():
                call.done.set_result(outcomes)

    def _store(
        self,
        session: Transaction,
        events: list[EventData],
        lease: outbox.Lease | None = None,
        published: outbox.Published | None = None,
    ) -> list[outbox.PublishOutcome]:
        return outbox.publish_events(
            session,
            events,
            now=time.time(),
            dashboard_base_url=self._dashboard_base_url,
            lease=lease,
            published=published,
        )

    def _stored(self, outcomes: Sequence[outbox.PublishOutcome]) -> None:
        if any(o.delivery_count and not o.duplicate for o in outcomes):
            self._on_stored()
