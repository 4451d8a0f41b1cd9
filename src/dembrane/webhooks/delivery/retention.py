"""Retention: events and attempts older than ``WEBHOOKS_RETENTION_DAYS`` are deleted.

Deletion goes in small batches, each its own short transaction, with a pause between them,
so that publishing and delivering never wait long behind it (on SQLite every write shares
one connection). Deleting an event takes its deliveries and their attempts with it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from dembrane.webhooks.background import BackgroundLoop
from dembrane.webhooks.store import outbox
from dembrane.webhooks.store.database import Database, OutageLog

__all__ = ["PurgeCounts", "RetentionTask", "purge_expired"]

log = logging.getLogger(__name__)

#: Rows deleted per transaction: small enough that a batch takes milliseconds.
BATCH_SIZE = 500
#: Events per transaction; each one may take several deliveries and attempts with it.
EVENT_BATCH_SIZE = 100
#: How often the periodic task runs.
INTERVAL_SECONDS = 3600.0
#: How long after start-up the first run happens (start-up has better things to do).
FIRST_RUN_DELAY_SECONDS = 60.0


@dataclass(frozen=True)
class PurgeCounts:
    """How many rows one purge deleted."""

    attempts: int
    events: int


async def purge_expired(
    database: Database,
    retention_seconds: float,
    *,
    now: float | None = None,
    batch_size: int = BATCH_SIZE,
    event_batch_size: int = EVENT_BATCH_SIZE,
    pause: float = 0.0,
) -> PurgeCounts:
    """Delete attempts and events older than ``retention_seconds``, batch by batch.

    ``pause`` is awaited between batches; even at zero it lets other store work in between.
    """
    cutoff = (time.time() if now is None else now) - retention_seconds
    attempts = 0
    while True:
        deleted = await database.run(outbox.delete_expired_attempts, cutoff, batch_size)
        attempts += deleted
        if deleted < batch_size:
            break
        await asyncio.sleep(pause)
    events = 0
    while True:
        deleted = await database.run(outbox.delete_expired_events, cutoff, event_batch_size)
        events += deleted
        if deleted < event_batch_size:
            break
        await asyncio.sleep(pause)
    return PurgeCounts(attempts=attempts, events=events)


class RetentionTask(BackgroundLoop):
    """Runs ``purge_expired`` now and then in the background until stopped."""

    name = "webhooks-retention"

    def __init__(
        self,
        database: Database,
        retention_days: float,
        *,
        interval: float = INTERVAL_SECONDS,
        first_delay: float = FIRST_RUN_DELAY_SECONDS,
        pause: float = 0.05,
    ) -> None:
        super().__init__()
        self._database = database
        self._retention_seconds = retention_days * 86400
        self._interval = interval
        self._first_delay = first_delay
        self._pause = pause

    async def _run(self) -> None:
        outage = OutageLog(log, "the retention run")
        await asyncio.sleep(self._first_delay)
        while True:
            try:
                counts = await purge_expired(
                    self._database, self._retention_seconds, pause=self._pause
                )
                if counts.attempts or counts.events:
                    log.info(
                        "retention deleted %d events and %d attempts",
                        counts.events,
                        counts.attempts,
                    )
            except Exception as error:
                outage.failed(error)
            else:
                outage.succeeded()
            await asyncio.sleep(self._interval)
