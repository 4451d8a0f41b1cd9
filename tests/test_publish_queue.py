"""Group commit of publish calls: shared transactions, answers per call, isolation of failures."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlmodel import Session

from dembrane.webhooks.domain.access import Tier
from dembrane.webhooks.domain.errors import FailedPrecondition
from dembrane.webhooks.domain.payload import (
    EventData,
    ProjectInfo,
    ReportData,
    body_parts,
    render_body,
)
from dembrane.webhooks.store import directory, outbox, publish_queue
from dembrane.webhooks.store.database import Database, StoreUnavailable, Transaction
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


async def test_bodies_rendered_ahead_are_stored_as_the_transaction_would_render_them(
    database: Database,
) -> None:
    """Bodies rendered on the event loop without their project and completed in the
    transaction are the bytes ``render_body`` gives with the project as stored then (renamed
    to a name beyond ASCII); so are a report's that takes its project's language (rendered in
    the transaction) and, written straight to the store, an event's whose parts were rendered
    for another dashboard address."""
    base = "https://dash.example.test"
    now = time.time()
    database.call(
        lambda s: directory.upsert_project(s, "p", "w", "Paardekop \u00e9\u00e9n", "nl", now)
    )
    project = ProjectInfo("p", "Paardekop \u00e9\u00e9n", "nl")
    queue = PublishQueue(database, base, lambda: None)
    own = report("e-own")
    inherits = report("e-inherits")
    inherits.report = ReportData(id="r", status="published", language="", date_created=None)
    await queue.publish([own, inherits])
    assert own.parts is not None
    assert own.parts.dashboard_base_url == base
    assert inherits.parts is None
    elsewhere = report("e-elsewhere")
    elsewhere.parts = body_parts(elsewhere, "https://old.example.test")
    database.call(lambda s: outbox.publish_events(s, [elsewhere], now=now, dashboard_base_url=base))

    def stored_body(event_id: str) -> bytes:
        return database.call(
            lambda s: bytes(
                s.execute(
                    text("SELECT body FROM events WHERE id = :id"), {"id": event_id}
                ).scalar_one()
            )
        )

    for event in (own, inherits, elsewhere):
        assert stored_body(event.id) == render_body(event, project, base)
    assert b'"language":"nl"' in stored_body("e-inherits")
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


class RecordingClaimer:
    """A dispatcher stand-in that leases up to ``limit`` rows and keeps what it is given."""

    def __init__(
        self,
        limit: int,
        excluded: dict[str, float] | None = None,
        held_until: dict[str, float] | None = None,
    ) -> None:
        self.limit = limit
        self.excluded = excluded or {}
        self.held_until = held_until or {}
        self.until = time.time() + 60
        self.admitted: list[outbox.DeliveryClaim] = []
        self.abandoned = 0
        self.outstanding = 0

    def lease_request(self) -> outbox.Lease | None:
        self.outstanding += 1
        return outbox.Lease(
            "dsp_test", self.until, self.limit, self.excluded, held_until=self.held_until
        )

    def admit_leased(self, lease: outbox.Lease, claims: list[outbox.DeliveryClaim]) -> None:
        self.outstanding -= 1
        self.admitted.extend(claims)

    def lease_abandoned(self, lease: outbox.Lease) -> None:
        self.outstanding -= 1
        self.abandoned += 1


def _leases(database: Database, event_ids: list[str]) -> dict[str, tuple[str | None, float]]:
    def read(session: Session) -> dict[str, tuple[str | None, float]]:
        rows = [row for e in event_ids for row in outbox.deliveries_of_event(session, e)]
        return {row.event_id: (row.lease_owner, row.next_attempt_at or 0.0) for row in rows}

    return database.call(read)


async def test_rows_of_a_webhook_cooling_down_are_due_when_it_ends(database: Database) -> None:
    """A new row of a webhook the dispatcher holds back until its cool-down ends is written
    due then, not leased; if a person changed the webhook since the dispatcher saw it, the
    row is due at once instead."""
    seen = database.call(lambda s: s.get(WebhookRow, "wh_1").updated_at)
    ends = time.time() + 300
    due: dict[str, tuple[str | None, float]] = {}
    for event_id, saw in (("held", seen), ("changed", seen - 1)):
        claimer = RecordingClaimer(10, excluded={"wh_1": saw}, held_until={"wh_1": ends})
        queue = PublishQueue(
            database, "https://dash.example.test", lambda: None, lambda c=claimer: c
        )
        await queue.publish([report(event_id)])
        due.update(_leases(database, [event_id]))
        assert claimer.admitted == []
    assert due["held"] == (None, ends)
    owner, changed_due = due["changed"]
    assert owner is None
    assert changed_due <= time.time()
    database.close()


async def test_new_rows_are_leased_to_the_dispatcher_in_the_same_transaction(
    database: Database,
) -> None:
    """New deliveries are written leased to the in-process dispatcher up to its room, handed
    over ready to send, and only the rows left due wake the claim loop."""
    wakes: list[int] = []
    claimer = RecordingClaimer(limit=2)
    queue = PublishQueue(
        database, "https://dash.example.test", lambda: wakes.append(1), claimer=lambda: claimer
    )
    before = time.time()
    await queue.publish([report("e1"), report("e2"), report("e3")])

    assert claimer.outstanding == 0
    assert sorted(c.event_id for c in claimer.admitted) == ["e1", "e2"]
    stored = database.call(lambda s: outbox.event_row(s, "e1"))
    assert stored is not None
    first = next(c for c in claimer.admitted if c.event_id == "e1")
    assert first.body == stored.body
    assert (first.url, first.secret, first.webhook_id) == (
        "https://example.com/hook",
        "a-secret-value",
        "wh_1",
    )
    leases = _leases(database, ["e1", "e2", "e3"])
    assert leases["e1"] == ("dsp_test", claimer.until)
    assert leases["e2"] == ("dsp_test", claimer.until)
    owner, due = leases["e3"]
    assert owner is None
    assert before <= due <= time.time()
    # The third row is due in the store, so the claim loop is told.
    assert wakes == [1]


async def test_rows_of_excluded_webhooks_are_written_due_without_waking_the_claim_loop(
    database: Database,
) -> None:
    """A webhook the dispatcher cannot send to now gets its rows written due, not leased, and
    the claim loop, whose claims would leave them too, is not woken for them; rows of such a
    webhook that a person changed since the dispatcher looked do wake it, for a claim to
    learn of the change."""
    seen = database.call(lambda s: s.get(WebhookRow, "wh_1").updated_at)
    for event_id, saw, woken in (("x1", seen, []), ("x2", seen - 1, [1])):
        wakes: list[int] = []
        claimer = RecordingClaimer(limit=10, excluded={"wh_1": saw})
        queue = PublishQueue(
            database,
            "https://dash.example.test",
            lambda w=wakes: w.append(1),
            claimer=lambda c=claimer: c,
        )
        await queue.publish([report(event_id)])
        assert claimer.admitted == []
        assert _leases(database, [event_id])[event_id][0] is None
        assert wakes == woken
    database.close()


async def test_a_failed_transaction_gives_the_lease_back(database: Database) -> None:
    """When the shared transaction fails, the dispatcher's reserved room is returned and the
    good call is still stored."""
    claimer = RecordingClaimer(limit=10)
    queue = PublishQueue(
        database, "https://dash.example.test", lambda: None, claimer=lambda: claimer
    )
    good = asyncio.create_task(queue.publish([report("ok-1")]))
    bad = asyncio.create_task(queue.publish([report("bad-1", project_id="nope")]))
    results = await asyncio.gather(good, bad, return_exceptions=True)
    assert isinstance(results[1], FailedPrecondition)
    assert claimer.abandoned == 1
    assert claimer.outstanding == 0
    assert database.call(lambda s: outbox.event_row(s, "ok-1")) is not None


class HeldStore:
    """Stands in for a queue's store function: the first transaction waits until released,
    and each notes how many events it took and when it wrote them."""

    def __init__(self, queue: PublishQueue) -> None:
        self._store = queue._store
        self.started = threading.Event()
        self.release = threading.Event()
        self.runs: list[tuple[int, float]] = []
        queue._store = self  # type: ignore[method-assign]

    def __call__(self, session: Transaction, events: list[EventData], *rest: Any) -> Any:
        if not self.started.is_set():
            self.started.set()
            self.release.wait(10)
        result = self._store(session, events, *rest)
        self.runs.append((len(events), time.monotonic()))
        return result


async def behind_a_held_transaction(
    database: Database, later_ids: list[str]
) -> tuple[HeldStore, asyncio.Task[Any], list[asyncio.Task[Any]]]:
    """A queue whose first transaction (event a1) is held on the store's thread, with a call
    for each of ``later_ids`` waiting behind it: the store, the first call, the later ones."""
    queue = PublishQueue(database, "https://dash.example.test", lambda: None)
    store = HeldStore(queue)
    first = asyncio.create_task(queue.publish([report("a1")]))
    await asyncio.to_thread(store.started.wait, 10)
    later = [asyncio.create_task(queue.publish([report(i)])) for i in later_ids]
    await asyncio.sleep(0.05)
    return store, first, later


async def test_the_next_transaction_starts_without_waiting_for_the_event_loop(
    database: Database,
) -> None:
    """Calls that arrive while a transaction is written go together into the next one, which
    the store starts as soon as the first is done, even while the event loop is busy."""
    store, first, later = await behind_a_held_transaction(database, ["b0", "b1", "b2"])
    store.release.set()
    time.sleep(0.5)  # noqa: ASYNC251 - the event loop is kept busy on purpose
    busy_until = time.monotonic()
    answers = await asyncio.gather(first, *later)
    assert [o.event_id for outcomes in answers for o in outcomes] == ["a1", "b0", "b1", "b2"]
    assert [count for count, _at in store.runs] == [1, 3]
    assert store.runs[1][1] < busy_until
    database.close()


async def test_calls_beyond_one_transactions_limit_go_in_the_next(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When more calls wait than one transaction takes, the rest go into the following ones;
    none is left waiting."""
    monkeypatch.setattr(publish_queue, "MAX_GROUP_EVENTS", 2)
    store, first, later = await behind_a_held_transaction(database, [f"b{i}" for i in range(5)])
    store.release.set()
    answers = await asyncio.wait_for(asyncio.gather(first, *later), timeout=10)
    assert [len(outcomes) for outcomes in answers] == [1] * 6
    assert [count for count, _at in store.runs] == [1, 2, 2, 1]
    assert database.call(lambda s: outbox.pending_count(s)) == 6
    database.close()


async def test_callers_never_wait_on_a_closed_store(database: Database) -> None:
    """Once the store is closed (the service stopping), a publish call fails at once instead
    of waiting for a transaction that never comes."""
    queue = PublishQueue(database, "https://dash.example.test", lambda: None)
    database.close()
    with pytest.raises(RuntimeError):
        await asyncio.wait_for(queue.publish([report("late")]), timeout=5)


async def test_a_store_that_fails_before_the_transaction_starts_answers_every_call(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the store cannot even open a transaction (a lost connection, a vanished file),
    the waiting calls hear the error, and the queue writes the calls that come after."""

    def unreachable(*_args: object, **_kwargs: object) -> Any:
        raise StoreUnavailable("the store is out of reach")

    queue = PublishQueue(database, "https://dash.example.test", lambda: None)
    with monkeypatch.context() as patch:
        patch.setattr(database, "call_driver", unreachable)
        patch.setattr(database, "run_driver", unreachable)
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(queue.publish([report("lost")]), timeout=5)
    outcomes = await asyncio.wait_for(queue.publish([report("after")]), timeout=5)
    assert [o.event_id for o in outcomes] == ["after"]
    database.close()


async def test_a_caller_that_goes_away_leaves_the_others_answered_and_its_events_stored(
    database: Database,
) -> None:
    """A caller cancelled while its call waits (a client that hung up) stops waiting, but the
    transaction goes on: the calls grouped with it get their answers, and its events are
    stored all the same, as the caller may already count on."""
    store, first, (gone, kept) = await behind_a_held_transaction(database, ["gone-1", "kept-1"])
    gone.cancel()
    store.release.set()
    answers = await asyncio.wait_for(asyncio.gather(first, kept), timeout=10)
    assert [o.event_id for outcomes in answers for o in outcomes] == ["a1", "kept-1"]
    assert gone.cancelled()
    assert [count for count, _at in store.runs] == [1, 2]
    assert database.call(lambda s: outbox.event_row(s, "gone-1")) is not None
    database.close()
