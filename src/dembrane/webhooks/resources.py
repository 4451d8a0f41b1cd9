"""What the servicers and the dispatcher share in one process: settings, store, sender."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from dembrane.webhooks.config import Settings
from dembrane.webhooks.delivery.sender import RequestSender
from dembrane.webhooks.delivery.targets import TargetPolicy
from dembrane.webhooks.store.database import Database
from dembrane.webhooks.store.publish_queue import Claimer


@dataclass
class Resources:
    """The long-lived objects of a running service."""

    settings: Settings
    database: Database
    policy: TargetPolicy
    sender: RequestSender
    # Set when new deliveries are due, so an idle dispatcher wakes at once.
    work_available: asyncio.Event = field(default_factory=asyncio.Event)
    # The dispatcher running in this process, which publishing transactions claim for.
    claimer: Claimer | None = None

    def wake_dispatcher(self) -> None:
        self.work_available.set()
