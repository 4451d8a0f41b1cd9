"""What the servicers and the dispatcher share in one process: settings, store, sender."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from dembrane.webhooks.config import Settings
from dembrane.webhooks.delivery.sender import Sender
from dembrane.webhooks.delivery.targets import TargetPolicy
from dembrane.webhooks.store.database import Database


@dataclass
class Resources:
    """The long-lived objects of a running service."""

    settings: Settings
    database: Database
    policy: TargetPolicy
    sender: Sender
    # Set when new deliveries are due, so an idle dispatcher wakes at once.
    work_available: asyncio.Event = field(default_factory=asyncio.Event)

    def wake_dispatcher(self) -> None:
        self.work_available.set()
