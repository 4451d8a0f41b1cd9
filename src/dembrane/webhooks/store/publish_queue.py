"""Group commit for publishing: concurrent publish calls share one transaction.

A commit costs a disk sync, which dwarfs the work of storing one event. Calls that arrive
while a transaction is being written wait for the next one and go in together, so under load
each sync acknowledges many calls, and an idle service still writes a lone call at once
(nothing waits for company). A call is answered only after the transaction holding its
events has committed.

If a shared transaction fails (say one call names a project the directory does not know),
every call of the group is written again on its own, so one caller's mistake never fails
another's events.

When a dispatcher runs in the same process, the transaction writes the new deliveries
already leased to it (as much as it has room for): the dispatcher has them in hand the moment
the call is acknowledged, with no claim transaction of its own in between.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from dembrane.webhooks.domain.payload import EventData
from dembrane.webhooks.store import outbox
from dembrane.webhooks.store.database import Database, Transaction

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
        self._waiting: list[_Call] = []
        #: The calls of the transaction being written.
        self._current: list[_Call] = []
        self._writer: asyncio.Task[None] | None = None

    async def publish(self, events: Sequence[EventData]) -> list[outbox.PublishOutcome]:
        """Store ``events`` (one call's, all or nothing) and their deliveries."""
        call = _Call(events)
        self._waiting.append(call)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_all(), name="webhooks-publish")
            self._writer.add_done_callback(self._writer_done)
        # Shielded: a caller that goes away must not cancel a transaction others wait on.
        return await asyncio.shield(call.done)

    async def _write_all(self) -> None:
        while self._waiting:
            group = self._take_group()
            self._current = group
            try:
                await self._write_group(group)
            except Exception:
                await self._write_each(group)
            self._current = []

    def _writer_done(self, task: asyncio.Task[None]) -> None:
        """Never leave a caller waiting on a writer that is gone (cancelled at shutdown)."""
        error = None if task.cancelled() else task.exception()
        if (error is None and not task.cancelled()) or task is not self._writer:
            # Finished with nothing left, or a newer writer owns what waits now.
            return
        stranded, self._current, self._waiting = self._current + self._waiting, [], []
        for call in stranded:
            if call.done.done():
                continue
            if error is None:
                call.done.cancel()
            else:
                call.done.set_exception(error)

    def _take_group(self) -> list[_Call]:
        group: list[_Call] = []
        total = 0
        while self._waiting:
            size = len(self._waiting[0].events)
            if group and total + size > MAX_GROUP_EVENTS:
                break
            group.append(self._waiting.pop(0))
            total += size
        return group

    async def _write_group(self, group: list[_Call]) -> None:
        events = [event for call in group for event in call.events]
        claimer = self._claimer()
        lease = None if claimer is None else claimer.lease_request()
        published = outbox.Published()
        try:
            outcomes = await self._db.run_driver(self._store, events, lease, published)
        except BaseException:
            if claimer is not None and lease is not None:
                claimer.lease_abandoned(lease)
            raise
        if claimer is not None and lease is not None:
            claimer.admit_leased(lease, published.claims)
        if lease is None or published.left_due:
            self._stored(outcomes)
        start = 0
        for call in group:
            end = start + len(call.events)
            if not call.done.done():
                call.done.set_result(outcomes[start:end])
            start = end

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
