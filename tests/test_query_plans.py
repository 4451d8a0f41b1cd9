"""The store's statements over deliveries, attempts and events never read a whole table.

A store holds millions of deliveries: a claim, a page of the delivery log, a breaker's
hold-back or a webhook's deletion that scanned the table would take seconds and hold every
other write of a SQLite store meanwhile. These tests run the store's functions on a real
SQLite file, collect every statement SQLite executed (with its parameters, as the driver's
trace gives it), and ask SQLite how it plans each one. SQLite plans by rules here (the
service never runs ``ANALYZE``), so a plan on a small table is the plan on a large one.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from dembrane.webhooks.domain.paging import Cursor
from dembrane.webhooks.store import directory, outbox, webhooks
from dembrane.webhooks.store.database import Database
from dembrane.webhooks.store.outbox import (
    AttemptRecord,
    DeliveryClaim,
    DeliveryResult,
    DeliveryState,
    HoldBack,
    Release,
)

from harness import fresh_database_url, publish_created, seed_store

pytestmark = pytest.mark.sqlite_only

#: The tables whose size grows with traffic.
_LARGE = ("deliveries", "attempts", "events")
#: A large table's name and what may follow it in a statement: the alias it goes by, if any.
_NAMED = re.compile(r"\b(?:" + "|".join(_LARGE) + r")\b(?:\s+(?:AS\s+)?(\w+))?", re.IGNORECASE)
_WORKSPACE, _PROJECT = "w-plans", "p-plans"
_HOOKS = ("wh_plans_a", "wh_plans_b")


class Traced:
    """A migrated SQLite store, seeded with a workspace, a project and two webhooks, that
    records every statement its connections execute."""

    def __init__(self, tmp_path: Path) -> None:
        self.url = fresh_database_url(tmp_path)
        self.path = self.url.removeprefix("sqlite:///")
        self.database = Database(self.url)
        self.statements: list[str] = []
        event.listen(self.database.engine, "connect", self._trace)
        self.database.migrate()
        self.seeded_at = seed_store(self.database, _PROJECT, _HOOKS)
        # What the migrations and the seeding ran is not the service's work.
        self.statements.clear()

    def _trace(self, dbapi_connection: sqlite3.Connection, _record: object) -> None:
        dbapi_connection.set_trace_callback(self.statements.append)

    def statements_to_plan(self) -> Iterator[str]:
        """The statements run so far that may read a large table: those that name one
        (their plain inserts aside), and every deletion, whose foreign keys' cascades read
        the tables that refer to the deleted rows. Not the schema's own statements, nor the
        transactions' frames."""
        for statement in dict.fromkeys(self.statements):
            words = statement.lstrip().split(None, 1)
            first = words[0].upper() if words else ""
            if first in ("BEGIN", "COMMIT", "ROLLBACK", "PRAGMA", "CREATE", "ALTER", "DROP"):
                continue
            if first == "INSERT" and " SELECT " not in statement.upper():
                continue
            if first == "DELETE" or any(re.search(rf"\b{table}\b", statement) for table in _LARGE):
                yield statement

    def full_scans(self) -> dict[str, list[str]]:
        """Each statement run so far that SQLite plans as a whole-table read, with the plan
        steps that read so."""
        found: dict[str, list[str]] = {}
        with contextlib.closing(sqlite3.connect(self.path)) as connection:
            # As the service's connections do: cascades are planned only with keys on.
            connection.execute("PRAGMA foreign_keys=ON")
            for statement in self.statements_to_plan():
                plan = [row[3] for row in connection.execute(f"EXPLAIN QUERY PLAN {statement}")]
                scans = full_scan_steps(statement, plan)
                if scans:
                    found[statement] = scans
        return found

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self.database.call(lambda session: fn(session, *args, **kwargs))

    def run_driver(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self.database.call_driver(lambda session: fn(session, *args, **kwargs))

    def close(self) -> None:
        self.database.close()


def full_scan_steps(statement: str, plan: list[str]) -> list[str]:
    """The steps of ``plan`` that read a large table of ``statement`` row by row.

    SQLite names a table in its plan by its alias when it has one (``SCAN d``), a foreign
    key's cascade by the table's own name, and a step that goes through an index says which
    (``SCAN deliveries USING COVERING INDEX ...``). Every word after a large table's name
    counts as an alias it may go by; keywords among them never name a plan step.
    """
    names = set(_LARGE)
    names.update(alias for alias in _NAMED.findall(statement) if alias)
    scans = []
    for step in plan:
        match = re.match(r"SCAN (\w+)(.*)", step)
        if match and match.group(1) in names and "USING" not in match.group(2):
            scans.append(step)
    return scans


@pytest.fixture
def traced(tmp_path: Path) -> Iterator[Traced]:
    store = Traced(tmp_path)
    try:
        yield store
    finally:
        store.close()


def _attempt(now: float, status_code: int) -> AttemptRecord:
    """A delivery's first attempt, answered with ``status_code``."""
    success = 200 <= status_code < 300
    return AttemptRecord(
        number=1,
        attempted_at=now,
        status_code=status_code,
        latency_ms=3.0,
        response_body="ok" if success else "",
        error="" if success else f"The receiver answered {status_code}.",
        success=success,
    )


def _result(
    claim: DeliveryClaim,
    status: DeliveryState,
    now: float,
    status_code: int,
    next_attempt_at: float | None = None,
) -> DeliveryResult:
    """The outcome of a claimed delivery's first attempt."""
    attempt = _attempt(now, status_code)
    return DeliveryResult(
        delivery_id=claim.delivery_id,
        webhook_id=claim.webhook_id,
        status=status,
        attempt_count=1,
        next_attempt_at=next_attempt_at,
        attempts=(attempt,),
        last_error=attempt.error,
    )


def test_the_delivery_path_reads_no_whole_table(traced: Traced) -> None:
    """Publishing, claiming, recording outcomes (a failure that holds a webhook back and a
    success), releasing, replaying the journal and counting the backlog each read deliveries
    through an index."""
    now = time.time()
    publish_created(traced.database, _PROJECT, range(4), now)
    # The same ids again: the duplicate check reads them back.
    publish_created(traced.database, _PROJECT, range(2), now)
    claims = traced.run_driver(
        outbox.claim_due, "owner-1", now, 60.0, 100, excluded={_HOOKS[1]: traced.seeded_at}
    )
    assert len(claims) == 4, "the claim leaves out the excluded webhook's rows"
    traced.run_driver(outbox.next_due_time, {_HOOKS[1]: traced.seeded_at})
    first, second, third = claims[0], claims[1], claims[2]
    results = [
        _result(first, DeliveryState.PENDING, now, 500, next_attempt_at=now + 30),
        _result(second, DeliveryState.SUCCEEDED, now, 200),
    ]
    traced.run_driver(
        outbox.record_results,
        "owner-1",
        results,
        [Release(third.delivery_id, now + 5)],
        now,
        3600.0,
        [HoldBack(_HOOKS[0], now + 60)],
    )
    traced.run_driver(
        outbox.replay_outcomes,
        [("owner-1", results[0])],
        now,
        3600.0,
    )
    traced.run(outbox.release_stale_leases, now)
    traced.run(outbox.backlog, now)

    assert traced.full_scans() == {}


def test_the_delivery_log_recovery_and_deletion_read_no_whole_table(traced: Traced) -> None:
    """A page of a webhook's log (filtered, and after a cursor), a delivery with its
    attempts, a retry, a recovery, resuming a webhook's rows, retention, and deleting a
    webhook and a project each read deliveries, attempts and events through an index."""
    now = time.time()
    publish_created(traced.database, _PROJECT, range(6), now)
    claims = traced.run_driver(outbox.claim_due, "owner-1", now, 60.0, 100)
    failed = [_result(claim, DeliveryState.FAILED, now, 500) for claim in claims]
    traced.run_driver(outbox.record_results, "owner-1", failed, [], now, 3600.0)
    hook = _HOOKS[0]

    page = traced.run(
        outbox.list_deliveries, hook, status=None, event_type=None, limit=2, after=None
    )
    assert len(page) == 3, "a page of two, and one more row telling of a next page"
    last = page[1]
    traced.run(
        outbox.list_deliveries,
        hook,
        status=DeliveryState.FAILED,
        event_type="conversation.created",
        limit=2,
        after=Cursor(last.created_at, last.id),
    )
    traced.run(outbox.latest_attempts, [row.id for row in page], 3)
    traced.run(outbox.get_delivery, hook, page[0].id)
    traced.run(outbox.retry_delivery, hook, page[0].id, now + 1)
    requeued = traced.run(outbox.requeue_failed_batch, hook, 0.0, now + 10, now + 10, now + 2, 50)
    assert requeued == 5, "the webhook's other failed deliveries are queued again"
    traced.run(webhooks.resume_pending, hook, now + 3)
    traced.run(outbox.delete_expired_attempts, now + 100, 1000)
    traced.run(outbox.delete_expired_events, now - 100, 1000)
    traced.run(webhooks.delete_some_deliveries, hook, 2)
    assert traced.run(webhooks.delete_webhook, hook)
    traced.run(directory.delete_project, _PROJECT)

    assert traced.full_scans() == {}


def test_a_whole_table_read_is_found() -> None:
    """The check itself: a large table read row by row, under its name or an alias, is
    caught; a read through an index, a small table and a VALUES list are not."""
    aliased = "SELECT a.id FROM attempts a WHERE a.attempted_at < 5"
    assert full_scan_steps(aliased, ["SCAN a"]) == ["SCAN a"]
    assert full_scan_steps("SELECT * FROM deliveries", ["SCAN deliveries"]) == ["SCAN deliveries"]
    indexed = "SELECT count(*) FROM deliveries WHERE status = 'pending'"
    assert (
        full_scan_steps(indexed, ["SCAN deliveries USING COVERING INDEX ix_deliveries_due"]) == []
    )
    searched = "SELECT id FROM deliveries WHERE next_attempt_at < 5"
    assert full_scan_steps(searched, ["SEARCH deliveries USING INDEX ix_deliveries_due"]) == []
    small = "SELECT * FROM webhooks w JOIN deliveries d ON d.webhook_id = w.id"
    assert full_scan_steps(small, ["SCAN w", "SEARCH d USING INDEX ix_x (webhook_id=?)"]) == []
    cascade = "DELETE FROM webhooks WHERE id = 'wh_1'"
    plan = ["SEARCH webhooks USING INDEX sqlite_autoindex_webhooks_1 (id=?)", "SCAN deliveries"]
    assert full_scan_steps(cascade, plan) == ["SCAN deliveries"]
    values = "UPDATE deliveries SET x = v.column2 FROM (VALUES (1, 2)) AS v WHERE id = v.column1"
    plan = ["SCAN v", "SEARCH deliveries USING INDEX sqlite_autoindex_deliveries_1 (id=?)"]
    assert full_scan_steps(values, plan) == []
