"""Store behaviour that no RPC shows directly."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy.exc import IntegrityError

from dembrane.webhooks.domain.access import Tier
from dembrane.webhooks.store import directory
from dembrane.webhooks.store.database import Database
from dembrane.webhooks.store.tables import WebhookRow

from harness import fresh_database_url


def test_database_errors_never_show_secrets(tmp_path: Path) -> None:
    """A failed statement's error, which may reach a log, hides the parameters (secrets)."""
    database = Database(fresh_database_url(tmp_path))
    database.migrate()
    now = time.time()

    def seed(session: object) -> None:
        directory.upsert_workspace(session, "w", "W", Tier.GUARDIAN, now)  # type: ignore[arg-type]
        directory.upsert_project(session, "p", "w", "P", "en", now)  # type: ignore[arg-type]

    database.call(seed)
    row = dict(
        project_id="p",
        name="Hook",
        url="https://example.com/h",
        events="[]",
        status="published",
        secret="whsec_super-secret-value",
        created_at=now,
        updated_at=now,
    )
    database.call(lambda s: s.add(WebhookRow(id="wh_1", **row)))
    with pytest.raises(IntegrityError) as caught:
        database.call(lambda s: s.add(WebhookRow(id="wh_1", **row)))
    assert "super-secret-value" not in str(caught.value)
    database.close()
