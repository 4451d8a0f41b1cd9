"""The backlog an operator watches: how many deliveries wait, and how late the oldest is.

Counters cannot give it: they start from zero at each start-up, while the store keeps what
waits across restarts, and deliveries deleted with their webhook never finish. So the
store itself is read now and then (on PostgreSQL every replica reads the shared backlog),
and ``/metrics`` shows the last reading.
"""

from __future__ import annotations

import asyncio
import logging
import time

from dembrane.webhooks import metrics
from dembrane.webhooks.background import BackgroundLoop
from dembrane.webhooks.store import outbox
from dembrane.webhooks.store.database import Database, OutageLog

__all__ = ["INTERVAL_SECONDS", "BacklogWatch"]

log = logging.getLogger(__name__)

#: How often the store is read: a count over the pending index, milliseconds even for a
#: backlog of a million.
INTERVAL_SECONDS = 15.0


class BacklogWatch(BackgroundLoop):
    """Reads the backlog from the store every ``interval`` seconds until stopped."""

    name = "webhooks-backlog"

    def __init__(self, database: Database, *, interval: float = INTERVAL_SECONDS) -> None:
        super().__init__()
        self._database = database
        self._interval = interval

    async def _run(self) -> None:
        outage = OutageLog(log, "reading the backlog")
        while True:
            try:
                now = time.time()
                pending, oldest_due = await self._database.run_relaxed(outbox.backlog, now)
            except Exception as error:
                outage.failed(error)
            else:
                outage.succeeded()
                metrics.STATS.backlog(pending, 0.0 if oldest_due is None else now - oldest_due)
            await asyncio.sleep(self._interval)
