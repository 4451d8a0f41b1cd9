"""Publishing and claiming keep the directory's facts in memory, and never act on stale ones.

Every change to what they read (a project's name, a workspace's tier, a webhook's address,
secret, status or subscriptions, a webhook added or deleted) is made here the way a person
at a SQL prompt would: behind the service's back, from another connection. The publication
and claim after it must show the change all the same.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlmodel import Session

from dembrane.webhooks.domain.access import Tier
from dembrane.webhooks.domain.errors import FailedPrecondition
from dembrane.webhooks.domain.payload import ConversationData, EventData
from dembrane.webhooks.store import directory, outbox
from dembrane.webhooks.store.database import Database
from dembrane.webhooks.store.tables import WebhookRow

from harness import fresh_database_url

SECRET = "whsec_" + "a" * 43
NOW = 1_800_000_000.0
STARTED = "conversation.started"


def _webhook(webhook_id: str, created_at: float = NOW) -> WebhookRow:
    return WebhookRow(
        id=webhook_id,
        project_id="p",
        name="n",
        url="http://127.0.0.1:9/hook",
        events=f'["{STARTED}"]',
        status="published",
        secret=SECRET,
        created_at=created_at,
        updated_at=created_at,
    )


def _database(tmp_path: Path) -> Database:
    database = Database(fresh_database_url(tmp_path))
    database.migrate()

    def seed(session: Session) -> None:
        directory.upsert_workspace(session, "ws", "W", Tier.CHANGEMAKER, NOW)
        session.flush()
        directory.upsert_project(session, "p", "ws", "Before", "en", NOW)
        session.add(_webhook("wh_1"))
        session.flush()

    database.call(seed)
    return database


def _event(event_id: str) -> EventData:
    return EventData(
        event_id, STARTED, "p", datetime.fromtimestamp(NOW, UTC), ConversationData("c")
    )


async def _publish(database: Database, event_id: str) -> outbox.PublishOutcome:
    (outcome,) = await database.run_driver(
        lambda s: outbox.publish_events(
            s, [_event(event_id)], now=NOW, dashboard_base_url="https://d"
        )
    )
    return outcome


async def _claim(database: Database) -> list[outbox.DeliveryClaim]:
    return await database.run_driver(lambda s: outbox.claim_due(s, "me", NOW, 60.0, 100))


def _write(database: Database, sql: str) -> None:
    with database.engine.begin() as connection:
        connection.execute(
            text(sql),
            {"secret": SECRET, "rotated": "whsec_" + "b" * 43, "lower": int(Tier.INNOVATOR)},
        )


def _stamp(database: Database) -> int:
    with database.engine.connect() as connection:
        return int(connection.execute(text("SELECT version FROM directory_version")).scalar_one())


Check = Callable[[outbox.PublishOutcome, list[outbox.DeliveryClaim]], None]


def _renamed(outcome: outbox.PublishOutcome, claims: list[outbox.DeliveryClaim]) -> None:
    assert b'"name":"After"' in claims[0].body


def _downgraded(outcome: outbox.PublishOutcome, claims: list[outbox.DeliveryClaim]) -> None:
    assert outcome.delivery_count == 0
    assert "innovator" in outcome.skip_reason
    assert claims == []


def _nothing_queued(outcome: outbox.PublishOutcome, claims: list[outbox.DeliveryClaim]) -> None:
    assert outcome.delivery_count == 0
    assert claims == []


def _moved(outcome: outbox.PublishOutcome, claims: list[outbox.DeliveryClaim]) -> None:
    assert [c.url for c in claims] == ["http://127.0.0.1:10/moved"]


def _rotated(outcome: outbox.PublishOutcome, claims: list[outbox.DeliveryClaim]) -> None:
    assert [c.secret for c in claims] == ["whsec_" + "b" * 43]


def _two_webhooks(outcome: outbox.PublishOutcome, claims: list[outbox.DeliveryClaim]) -> None:
    assert outcome.delivery_count == 2
    assert sorted(c.webhook_id for c in claims) == ["wh_1", "wh_2"]


CHANGES = {
    "project renamed": ("UPDATE projects SET name = 'After'", _renamed),
    "tier lowered": ("UPDATE workspaces SET tier = :lower", _downgraded),
    "webhook paused": ("UPDATE webhooks SET status = 'paused'", _nothing_queued),
    "webhook moved": ("UPDATE webhooks SET url = 'http://127.0.0.1:10/moved'", _moved),
    "secret rotated": ("UPDATE webhooks SET secret = :rotated", _rotated),
    "subscriptions changed": (
        "UPDATE webhooks SET events = '[\"report.generated\"]'",
        _nothing_queued,
    ),
    "webhook added": (
        "INSERT INTO webhooks (id, project_id, name, url, events, status, secret, "
        "disabled_reason, created_at, updated_at) SELECT 'wh_2', project_id, name, url, "
        "events, status, secret, '', created_at + 1, updated_at + 1 FROM webhooks",
        _two_webhooks,
    ),
    "webhook deleted": ("DELETE FROM webhooks", _nothing_queued),
}


@pytest.mark.parametrize("change", list(CHANGES))
async def test_a_change_made_behind_the_services_back_shows_in_the_next_publication(
    tmp_path: Path, change: str
) -> None:
    """After a publication and a claim have read (and kept) the directory's facts, a change
    written from another connection shows in the next publication's deliveries and claims."""
    database = _database(tmp_path)
    try:
        warm = await _publish(database, "e1")
        assert warm.delivery_count == 1
        (first,) = await _claim(database)
        assert b'"name":"Before"' in first.body
        sql, check = CHANGES[change]
        _write(database, sql)
        outcome = await _publish(database, "e2")
        check(outcome, await _claim(database))
    finally:
        database.close()


async def test_a_project_deleted_behind_the_services_back_is_unknown_to_the_next_publication(
    tmp_path: Path,
) -> None:
    """Facts kept of a project that has since been deleted are not used: publishing to it
    is refused as to any unknown project, and nothing is stored."""
    database = _database(tmp_path)
    try:
        await _publish(database, "e1")
        _write(database, "DELETE FROM projects")
        with pytest.raises(FailedPrecondition) as refused:
            await _publish(database, "e2")
        assert "unknown to the directory" in str(refused.value)
        stored = database.call(lambda s: outbox.event_row(s, "e2"))
        assert stored is None
    finally:
        database.close()


@pytest.mark.sqlite_only
async def test_without_its_stamp_row_the_directory_is_read_each_time(tmp_path: Path) -> None:
    """A stamp row deleted by hand leaves nothing to tell kept facts from stale ones, so
    none are kept: publishing and claiming still work, and still see every change."""
    database = _database(tmp_path)
    try:
        _write(database, "DELETE FROM directory_version")
        await _publish(database, "e1")
        (first,) = await _claim(database)
        assert first.url == "http://127.0.0.1:9/hook"
        _write(database, "UPDATE projects SET name = 'After'")
        _write(database, "UPDATE webhooks SET url = 'http://127.0.0.1:10/moved'")
        await _publish(database, "e2")
        (second,) = await _claim(database)
        assert b'"name":"After"' in second.body
        assert second.url == "http://127.0.0.1:10/moved"
    finally:
        database.close()


@pytest.mark.sqlite_only
async def test_only_changes_to_what_is_read_draw_a_new_stamp(tmp_path: Path) -> None:
    """The dispatcher's own bookkeeping on webhooks (when failures began) and names that no
    delivery shows leave the stamp, and so the facts in memory, as they were; a change to a
    fact draws a new stamp."""
    database = _database(tmp_path)
    try:
        before = _stamp(database)
        _write(database, "UPDATE webhooks SET failing_since = 5, name = 'renamed hook'")
        _write(database, "UPDATE workspaces SET name = 'Renamed workspace'")
        assert _stamp(database) == before
        _write(database, "UPDATE webhooks SET status = 'paused'")
        assert _stamp(database) != before
    finally:
        database.close()


@pytest.mark.sqlite_only
async def test_facts_read_in_a_rolled_back_transaction_are_not_taken_for_later_ones(
    tmp_path: Path,
) -> None:
    """A transaction that renames a project, publishes under the new name and is rolled
    back leaves that name in memory; a later, different change must not make it count. A
    stamp counted up would come round to the rolled-back number again; a drawn one does
    not."""
    database = _database(tmp_path)
    try:
        await _publish(database, "e1")

        def rename_then_fail(session: Session) -> None:
            session.execute(text("UPDATE projects SET name = 'Ghost'"))
            outbox.publish_events(session, [_event("e2")], now=NOW, dashboard_base_url="x")
            kept = outbox._kept_facts(session)
            assert kept.projects["p"].info.name == "Ghost"
            raise RuntimeError("rolled back")

        with pytest.raises(RuntimeError):
            database.call(rename_then_fail)
        _write(database, "UPDATE webhooks SET url = 'http://127.0.0.1:10/moved'")
        await _publish(database, "e3")
        claims = {c.event_id: c for c in await _claim(database)}
        assert b'"name":"Before"' in claims["e3"].body
        assert claims["e3"].url == "http://127.0.0.1:10/moved"
    finally:
        database.close()
