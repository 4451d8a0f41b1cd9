"""SQLite's per-webhook index takes new deliveries a pass late; nothing by webhook misses them.

Publishing on SQLite writes its rows outside ``ix_deliveries_webhook_created`` and a pass a
second brings them in (migration 0006). Everything that reads a webhook's rows (the log and
its pages, recovery, deletion) must see rows on both sides of that pass, and a webhook's
deletion must take them all, since no key takes them with it on SQLite.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from dembrane.webhooks.delivery.indexing import IndexTask
from dembrane.webhooks.domain.paging import Cursor
from dembrane.webhooks.store import directory, outbox, webhooks
from dembrane.webhooks.store.database import Database
from dembrane.webhooks.store.outbox import AttemptRecord, DeliveryResult, DeliveryState

from harness import fresh_database_url, publish_created, seed_store

pytestmark = pytest.mark.sqlite_only

_PROJECT = "p-late"
_HOOKS = ("wh_late_a", "wh_late_b")
_DASHBOARD = "https://dash.example"


def _store(tmp_path: Path) -> Database:
    database = Database(fresh_database_url(tmp_path))
    database.migrate()
    seed_store(database, _PROJECT, _HOOKS)
    return database


def _publish(database: Database, numbers: range, now: float) -> None:
    publish_created(database, _PROJECT, numbers, now)


def _index(database: Database) -> int:
    return database.call_driver(outbox.index_new_deliveries, relaxed=True)


def _indexed_counts(database: Database) -> dict[int, int]:
    rows = database.call(
        lambda s: s.execute(
            text("SELECT webhook_indexed, count(*) FROM deliveries GROUP BY webhook_indexed")
        ).all()
    )
    return {int(flag): int(count) for flag, count in rows}


def _fail_all(database: Database, now: float) -> None:
    claims = database.call_driver(lambda s: outbox.claim_due(s, "owner-1", now, 60.0, 1000))
    failed = [
        DeliveryResult(
            delivery_id=claim.delivery_id,
            webhook_id=claim.webhook_id,
            status=DeliveryState.FAILED,
            attempt_count=1,
            attempts=(
                AttemptRecord(
                    number=1,
                    attempted_at=now,
                    status_code=500,
                    latency_ms=2.0,
                    response_body="",
                    error="The receiver answered 500.",
                    success=False,
                ),
            ),
            last_error="The receiver answered 500.",
        )
        for claim in claims
    ]
    database.call_driver(lambda s: outbox.record_results(s, "owner-1", failed, [], now, 3600.0))


def test_published_rows_enter_the_webhook_index_at_the_next_pass(tmp_path: Path) -> None:
    """Rows published on SQLite start outside the per-webhook index; a pass brings every one
    in and says how many, and the next pass finds none."""
    database = _store(tmp_path)
    _publish(database, range(5), time.time())
    assert _indexed_counts(database) == {0: 10}
    assert _index(database) == 10
    assert _indexed_counts(database) == {1: 10}
    assert _index(database) == 0
    database.close()


def test_the_log_pages_through_indexed_and_new_rows_once_each(tmp_path: Path) -> None:
    """A webhook's log, page by page, lists every delivery once, newest first, whether the
    row is in the index yet or not, with or without a filter."""
    database = _store(tmp_path)
    start = time.time()
    for number in range(7):
        _publish(database, range(number, number + 1), start + number)
        if number == 3:
            _index(database)
    assert _indexed_counts(database) == {0: 6, 1: 8}

    def pages(status: DeliveryState | None) -> list[str]:
        seen: list[str] = []
        after: Cursor | None = None
        while True:
            rows = database.call(
                lambda s, after=after: outbox.list_deliveries(
                    s, _HOOKS[0], status=status, event_type=None, limit=2, after=after
                )
            )
            seen.extend(row.event_id for row in rows[:2])
            if len(rows) <= 2:
                return seen
            after = Cursor(rows[1].created_at, rows[1].id)

    newest_first = [f"evt-{_PROJECT}-{number}" for number in reversed(range(7))]
    assert pages(None) == newest_first
    assert pages(DeliveryState.PENDING) == newest_first
    assert pages(DeliveryState.FAILED) == []
    database.close()


def test_recovery_and_deletion_reach_rows_not_yet_indexed(tmp_path: Path) -> None:
    """A recovery queues a webhook's failed rows on both sides of the pass; deleting in
    batches takes at most a batch each time; deleting the webhook takes the rest with their
    attempts, and deleting the project those of its other webhook, leaving no row behind."""
    database = _store(tmp_path)
    now = time.time()
    _publish(database, range(4), now)
    _index(database)
    _publish(database, range(4, 8), now + 1)
    _fail_all(database, now + 2)

    requeued = database.call(
        lambda s: outbox.requeue_failed_batch(s, _HOOKS[0], 0.0, now + 10, now + 10, now + 3, 100)
    )
    assert requeued == 8
    assert database.call(lambda s: webhooks.delete_some_deliveries(s, _HOOKS[0], 5)) == 5
    assert database.call(lambda s: webhooks.delete_webhook(s, _HOOKS[0]))

    def count(sql: str) -> int:
        return int(database.call(lambda s: s.execute(text(sql)).scalar_one()))

    assert count("SELECT count(*) FROM deliveries WHERE webhook_id = 'wh_late_a'") == 0
    assert count("SELECT count(*) FROM deliveries") == 8
    assert count("SELECT count(*) FROM attempts") == 8, "the other webhook's attempts stay"

    _publish(database, range(8, 10), now + 4)
    assert database.call(lambda s: directory.delete_project(s, _PROJECT)) == 1
    assert count("SELECT count(*) FROM deliveries") == 0
    assert count("SELECT count(*) FROM attempts") == 0
    database.close()


async def test_the_index_task_brings_new_rows_in_while_the_service_runs(tmp_path: Path) -> None:
    """The background pass indexes rows published after it started, without being asked."""
    database = _store(tmp_path)
    task = IndexTask(database, interval=0.02)
    task.start()
    try:
        _publish(database, range(3), time.time())
        for _ in range(250):
            if _indexed_counts(database) == {1: 6}:
                break
            await asyncio.sleep(0.02)
        assert _indexed_counts(database) == {1: 6}
    finally:
        await task.stop()
        database.close()


def test_the_upgrade_keeps_every_delivery_and_attempt_and_indexes_them(tmp_path: Path) -> None:
    """Migrating a store from revision 0005 rebuilds the deliveries table without its key to
    the webhooks, keeps every delivery and attempt (none cascades away with the old table),
    counts the old rows as indexed, and leaves foreign keys on for the service."""
    url = fresh_database_url(tmp_path)
    database = Database(url)
    database.migrate("0005")
    database.close()
    path = url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as raw:
        raw.executescript(
            """
            INSERT INTO workspaces (id, name, tier, created_at, updated_at)
                VALUES ('w-old', 'W', 2, 1.0, 1.0);
            INSERT INTO projects (id, workspace_id, name, language, created_at, updated_at)
                VALUES ('p-old', 'w-old', 'P', 'en', 1.0, 1.0);
            INSERT INTO webhooks (id, project_id, name, url, events, status, secret,
                                  disabled_reason, created_at, updated_at)
                VALUES ('wh_old', 'p-old', 'H', 'https://receiver.example/h', '[]',
                        'published', 'whsec_b2xkLXdlYmhvb2stc2VjcmV0', '', 1.0, 1.0);
            INSERT INTO events (id, type, project_id, occurred_at, created_at, body,
                                skip_reason, delivery_count)
                VALUES ('evt-old', 'conversation.created', 'p-old', 1.0, 1.0, X'7B7D', '', 1);
            INSERT INTO deliveries (id, event_id, webhook_id, event_type, status,
                                    attempt_count, created_at, updated_at, last_error,
                                    skip_reason)
                VALUES ('dlv_old', 'evt-old', 'wh_old', 'conversation.created', 'failed', 1,
                        1.0, 1.0, 'The receiver answered 500.', '');
            INSERT INTO attempts (delivery_id, number, attempted_at, status_code, latency_ms,
                                  response_body, error, success)
                VALUES ('dlv_old', 1, 1.0, 500, 2.0, '', 'The receiver answered 500.', 0);
            """
        )

    database = Database(url)
    database.migrate()
    with sqlite3.connect(path) as raw:
        assert raw.execute("SELECT id, webhook_indexed FROM deliveries").fetchall() == [
            ("dlv_old", 1)
        ]
        assert raw.execute("SELECT delivery_id FROM attempts").fetchall() == [("dlv_old",)]
        keys = {row[2] for row in raw.execute("PRAGMA foreign_key_list(deliveries)")}
        assert keys == {"events"}
        assert {row[2] for row in raw.execute("PRAGMA foreign_key_list(attempts)")} == {
            "deliveries"
        }
    assert database.call(lambda s: s.execute(text("PRAGMA foreign_keys")).scalar_one()) == 1
    rows = database.call(
        lambda s: outbox.list_deliveries(
            s, "wh_old", status=None, event_type=None, limit=10, after=None
        )
    )
    assert [row.id for row in rows] == ["dlv_old"]
    database.close()
