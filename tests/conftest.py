"""Shared fixtures: a real service on loopback ports, tokens, and a seeded directory.

Every test gets its own SQLite file in a temporary folder and its own server on port 0.
The types behind the fixtures live in ``harness.py``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from dembrane.webhooks.config import Settings

from harness import Stubs, Tokens, World, make_settings, seed_world

if TYPE_CHECKING:
    from dembrane.webhooks.service import Service


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests of PostgreSQL-only behaviour run in the PostgreSQL lane of ``make test``."""
    if os.environ.get("WEBHOOKS_TEST_BACKEND") == "postgres":
        return
    skip = pytest.mark.skip(reason="PostgreSQL only; runs in the PostgreSQL lane")
    for item in items:
        if "postgres_only" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
async def service(settings: Settings) -> AsyncIterator[Service]:
    from dembrane.webhooks.service import Service

    running = Service(settings)
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


@pytest.fixture
def tokens(settings: Settings) -> Tokens:
    assert settings.jwt_secret is not None
    return Tokens(settings.jwt_secret)


@pytest.fixture
async def stubs(service: Service) -> AsyncIterator[Stubs]:
    channel = grpc.aio.insecure_channel(service.grpc_target)
    try:
        yield Stubs.on(channel)
    finally:
        await channel.close()


@pytest.fixture
async def world(stubs: Stubs, tokens: Tokens) -> World:
    return await seed_world(stubs, tokens)
