"""Bringing SQLite's new deliveries into the per-webhook index, a second late.

Publishing on SQLite writes its rows outside ``ix_deliveries_webhook_created`` (migration
0006, ``outbox.index_new_deliveries``): at once, every publishing transaction would write a
leaf page of it for each webhook its events go to. This task brings the rows in once a
second, in a relaxed transaction on the store's thread: a lost pass only leaves its rows for
the next one, and queries by webhook read rows not yet in the index through their own.
"""

from __future__ import annotations

import asyncio
import logging

from dembrane.webhooks.background import BackgroundLoop
from dembrane.webhooks.store import outbox
from dembrane.webhooks.store.database import Database, OutageLog

__all__ = ["INTERVAL_SECONDS", "IndexTask"]

log = logging.getLogger(__name__)

#: How often a pass runs; a full batch is followed by the next at once.
INTERVAL_SECONDS = 1.0


class IndexTask(BackgroundLoop):
    """Runs ``outbox.index_new_deliveries`` every ``interval`` seconds until stopped."""

    name = "webhooks-index"

    def __init__(self, database: Database, *, interval: float = INTERVAL_SECONDS) -> None:
        super().__init__()
        self._database = database
        self._interval = interval

    async def _run(self) -> None:
        outage = OutageLog(log, "indexing new deliveries")
        while True:
            indexed = 0
            try:
                indexed = await self._database.run_driver(outbox.index_new_deliveries, relaxed=True)
            except Exception as error:
                outage.failed(error)
            else:
                outage.succeeded()
            await asyncio.sleep(0 if indexed >= outbox.INDEX_BATCH else self._interval)
