"""Wake-ups across replicas on PostgreSQL: ``LISTEN`` for the outbox's due announcements.

Every replica's dispatcher keeps one connection listening on ``outbox.DUE_CHANNEL``; a
publish, retry or recovery in any replica notifies it on commit, so an idle dispatcher starts
at once instead of at its next idle check. A lost connection is re-opened with a growing
pause; meanwhile the dispatcher's idle check still finds the work.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import psycopg
from sqlalchemy.engine import make_url

from dembrane.webhooks.background import BackgroundLoop
from dembrane.webhooks.store.database import OutageLog
from dembrane.webhooks.store.outbox import DUE_CHANNEL

log = logging.getLogger(__name__)

MAX_RECONNECT_SECONDS = 30.0


def libpq_url(sqlalchemy_url: str) -> str:
    """The plain ``postgresql://`` URL psycopg takes, from a SQLAlchemy one."""
    return (
        make_url(sqlalchemy_url).set(drivername="postgresql").render_as_string(hide_password=False)
    )


class DueListener(BackgroundLoop):
    """Calls ``on_due`` whenever any replica announces due deliveries."""

    name = "webhooks-due-listener"

    def __init__(self, sqlalchemy_url: str, on_due: Callable[[], None]) -> None:
        super().__init__()
        self._url = libpq_url(sqlalchemy_url)
        self._on_due = on_due
        self.listening = asyncio.Event()

    async def _run(self) -> None:
        outage = OutageLog(log, "listening for due deliveries")
        pause = 0.5
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._url, autocommit=True
                ) as connection:
                    await connection.execute(f"LISTEN {DUE_CHANNEL}")
                    self.listening.set()
                    outage.succeeded()
                    pause = 0.5
                    # Work announced while the connection was down is found by this wake-up.
                    self._on_due()
                    async for _notification in connection.notifies():
                        self._on_due()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                outage.failed(error, unavailable=True)
            self.listening.clear()
            await asyncio.sleep(pause)
            pause = min(pause * 2, MAX_RECONNECT_SECONDS)
