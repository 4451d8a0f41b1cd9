"""Group commit of publish calls: shared transactions, answers per call, isolation of failures."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlmodel import Session

from dembrane.webhooks.domain.access import Tier
from dembrane.webhooks.domain.errors import FailedPrecondition
from dembrane.webhooks.domain.payload import EventData, ReportData
from dembrane.webhooks.store import directory, outbox
from dembrane.webhooks.store.database import Database
from dembrane.webhooks.store.publish_queue import PublishQueue
from dembrane.webhooks.store.tables import WebhookRow

from harness import fresh_database_url


def report(event_id: str, project_id: str = "p") -> EventData:
    return EventData(
        id=event_id,
        type="report.generated",
        project_id=project_id,
        occurred_at=datetime.now(UTC),
        conversation=None,
        report=ReportData(id="r", status="published", language="en", date_created=None),
        dashboard_url=None,
    )


@pytest.fixture
def database(tmp_path: Path) -> Database:
    database = Database(fresh_database_url(tmp_path))
    database.migrate()
    now = time.time()

    def seed(session: Session) -> None:
        directory.upsert_workspace(session, "w", "W", Tier.CHANGEMAKER, now)
        directory.upsert_project(session, "p", "w", "P", "en", now)
        session.add(
            WebhookRow(
                id="wh_1",
                project_id="p",
                name="Hook",
                url="https://example.com/hook",
                events='["report.generated"]',
                status="published",
                secret="a-secret-value",
                created_at=now,
                updated_at=now,
            )
        )

    database.call(seed)
    return database


async def test_concurrent_calls_get_their_own_outcomes(database: Database) -> None:
    """Calls written together each get the outcomes of their own events, in order."""
    wakes: list[int] = []
    queue = PublishQueue(database, "https://dash.example.test", lambda: wakes.append(1))
    calls = [[report(f"e{i}-{j}") for j in range(i + 1)] for i in range(5)]
    answers = await asyncio.gather(*(queue.publish(call) for call in calls))
    for call, outcomes in zip(calls, answers, strict=True):
        assert [o.event_id for o in outcomes] == [e.id for e in call]
        assert all(o.delivery_count == 1 and not o.duplicate for o in outcomes)
    assert wakes
    stored = database.call(lambda s: outbox.pending_count(s))
    assert stored == sum(len(c) for c in calls)
    database.close()


async def test_one_bad_call_does_not_fail_the_others(database: Database) -> None:
    """A call naming an unknown project fails alone; the calls grouped with it are stored."""
    queue = PublishQueue(database, "https://dash.example.test", lambda: None)
    good, bad, later = [report("g1")], [report("b1", project_id="nowhere")], [report("l1")]
    results = await asyncio.gather(
        queue.publish(good), queue.publish(bad), queue.publish(later), return_exceptions=True
    )
    assert isinstance(results[1], FailedPrecondition)
    assert [o.event_id for o in results[0]] == ["g1"]  # type: ignore[union-attr]
    assert [o.event_id for o in results[2]] == ["l1"]  # type: ignore[union-attr]
    assert database.call(lambda s: outbox.event_row(s, "b1")) is None
    assert database.call(lambda s: outbox.event_row(s, "l1")) is not None
    database.close()


async def test_the_same_id_in_two_grouped_calls_is_stored_once(database: Database) -> None:
    """Two calls racing with one event id: the first stores it, the second hears duplicate."""
    queue = PublishQueue(database, "https://dash.example.test", lambda: None)
    first, second = await asyncio.gather(
        queue.publish([report("same")]), queue.publish([report("same")])
    )
    assert (first[0].duplicate, second[0].duplicate) == (False, True)
    assert database.call(lambda s: len(outbox.deliveries_of_event(s, "same"))) == 1
    database.close()
