"""The outbox: published events, their deliveries and attempts, and the queries on them.

Publishing writes an event and one delivery row per matching webhook in the caller's
transaction; the dispatcher then claims due rows, sends them, and records what came of them.
Every hot statement here is written for few round trips and batch sizes that stay bounded:

* claiming picks due rows through the partial index ``ix_deliveries_due`` (only pending
  rows, by due time, with their webhook so that rows of webhooks left out are passed over
  in the index; the literal ``status = 'pending'`` lets SQLite use that index), leases
  them to one dispatcher by pushing ``next_attempt_at`` to the lease's end, then reads what
  the sender needs: the deliveries with their bodies, and each webhook once;
* recording a batch of outcomes is one read of the rows still leased, then one multi-row
  statement per kind of write (attempt inserts, row updates) plus a few updates of the
  webhooks concerned, which only write a webhook whose state changes;
* finishing and releasing only touch rows still leased to the caller, so a dispatcher whose
  lease ran out cannot overwrite another one's work;
* a dispatcher may name webhooks whose receivers are unwell: a claim leaves their rows in
  the store, and a webhook whose circuit breaker opened has its rows wait out the cool-down
  there (``HoldBack``), so they are not claimed only to be handed back.

The hot statements run on the driver's cursor (see the note above ``claim_due``). On
PostgreSQL the claim's subquery adds ``FOR UPDATE SKIP LOCKED`` so replicas never wait on
each other. No function loads more than one batch of rows into memory.
"""

from __future__ import annotations

import functools
import json
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, cast

from sqlalchemy import Table, func, select, text, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, SQLModel, col

from dembrane.webhooks.domain.access import WEBHOOK_TIER, Tier, tier_allows_webhooks
from dembrane.webhooks.domain.errors import AlreadyExists, FailedPrecondition
from dembrane.webhooks.domain.ids import new_id
from dembrane.webhooks.domain.paging import Cursor
from dembrane.webhooks.domain.payload import EventData, ProjectInfo, body_of
from dembrane.webhooks.domain.webhooks import signing_secrets
from dembrane.webhooks.store.database import DriverSession, Transaction, rows_changed
from dembrane.webhooks.store.tables import AttemptRow, DeliveryRow, EventRow, WebhookRow

__all__ = [
    "ERROR_MAX",
    "MAX_EXCLUDED",
    "AttemptRecord",
    "DeliveryClaim",
    "DeliveryResult",
    "DeliveryState",
    "HoldBack",
    "Lease",
    "PublishOutcome",
    "Published",
    "Quota",
    "RecordEffects",
    "Release",
    "claim_due",
    "delete_expired_attempts",
    "delete_expired_events",
    "deliveries_of_event",
    "disabled_error",
    "event_row",
    "get_delivery",
    "list_deliveries",
    "next_due_time",
    "pending_count",
    "publish_events",
    "record_results",
    "release_stale_leases",
    "replay_outcomes",
    "requeue_failed_batch",
    "retry_delivery",
    "tier_skip_reason",
]

#: The longest error sentence the log keeps (the columns' size).
ERROR_MAX = 1000
_REASON_MAX = 500


class DeliveryState(StrEnum):
    """Where a delivery stands; the strings stored in ``deliveries.status``."""

    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"


def _table(name: str) -> Table:
    return SQLModel.metadata.tables[name]


def is_postgres(session: Transaction) -> bool:
    if isinstance(session, DriverSession):
        return False
    return session.get_bind().dialect.name == "postgresql"


def _orm(session: Transaction) -> Session:
    """The Session of a PostgreSQL transaction (a driver's connection is SQLite's only)."""
    if isinstance(session, DriverSession):
        raise TypeError("this statement needs a Session")
    return session


#: The PostgreSQL channel on which new due work is announced to every replica's dispatcher.
DUE_CHANNEL = "webhooks_due"


def announce_due(session: Transaction) -> None:
    """Tell the dispatchers of every replica that work came due (PostgreSQL only).

    The notification is sent when the transaction commits, never before, and PostgreSQL
    folds repeats within one transaction into one. On SQLite a single process owns the
    database and wakes its own dispatcher.
    """
    if is_postgres(session):
        _orm(session).execute(text("SELECT pg_notify(:channel, '')"), {"channel": DUE_CHANNEL})


def _clip(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - 1] + "…"


def tier_skip_reason(tier: Tier) -> str:
    """Why nothing is delivered for a project whose workspace is on ``tier``."""
    return f"The workspace is on the {tier.label} tier; webhooks need {WEBHOOK_TIER.label}."


# -- publishing ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PublishOutcome:
    """What became of one published event."""

    event_id: str
    #: Whether the id was published before; the counts then describe that first publication.
    duplicate: bool
    #: How many deliveries were queued for the event (skipped ones are not counted).
    delivery_count: int
    skip_reason: str
    #: Deliveries written already finished, unsent: skipped (a paused webhook, a tier below
    #: webhooks) and failed (a disabled webhook). Zero for a duplicate.
    skipped_count: int = 0
    failed_count: int = 0


@dataclass(frozen=True, slots=True)
class Quota:
    """How many rows of each webhook a dispatcher may lease: ``per_webhook`` less the rows
    of that webhook it ``held`` when it asked. One busy webhook then cannot fill the
    dispatcher's memory, and the rows of other webhooks, due later, still find room."""

    per_webhook: int
    held: Mapping[str, int] = field(default_factory=dict)

    def pick(self, rows: Iterable[tuple[str, str]]) -> list[str]:
        """The ids, in order, of the ``(id, webhook id)`` rows within each webhook's room."""
        counts = dict(self.held)
        chosen: list[str] = []
        for delivery_id, webhook_id in rows:
            count = counts.get(webhook_id, 0)
            if count < self.per_webhook:
                counts[webhook_id] = count + 1
                chosen.append(delivery_id)
        return chosen


@dataclass(frozen=True, slots=True)
class Lease:
    """Lease new deliveries to a dispatcher as they are written (see ``publish_events``)."""

    owner: str
    until: float
    #: The most rows to lease; the rest are written due, for any dispatcher's claim.
    limit: int
    #: Webhooks whose rows the dispatcher cannot take now (as ``claim_due`` counts them).
    excluded: Mapping[str, float] = field(default_factory=dict)
    #: The most rows of each webhook to lease, if bounded.
    quota: Quota | None = None
    #: Webhooks cooling down (breaker open), with the cool-down's end: their new rows are
    #: written due then, as the breaker held back their older ones, rather than due now at
    #: the front of the due index, where every claim until then would walk past them.
    held_until: Mapping[str, float] = field(default_factory=dict)


@dataclass
class Published:
    """What ``publish_events`` did with a lease: the rows it leased, and those left due."""

    claims: list[DeliveryClaim] = field(default_factory=list)
    left_due: int = 0
    #: Of the rows left due, those of webhooks the lease left out, unchanged since the
    #: dispatcher looked: its claims would leave them too, so they need not wake it.
    left_out: int = 0


def publish_events(
    session: Transaction,
    events: Sequence[EventData],
    *,
    now: float,
    dashboard_base_url: str,
    lease: Lease | None = None,
    published: Published | None = None,
) -> list[PublishOutcome]:
    """Store ``events`` and their deliveries; return one outcome per event, in order.

    An id that is already stored, or that appears earlier in ``events``, is a duplicate:
    nothing is written for it and its outcome repeats the first publication's; raises
    ``AlreadyExists`` if that event is of another project or type. Raises
    ``FailedPrecondition`` when a new event's project is unknown, so that nothing of the
    batch is stored.

    With a ``lease``, new pending deliveries are written already leased to its owner (up to
    its limit), exactly as ``claim_due`` would lease them, and come back in ``published``
    ready to send: the dispatcher of the publishing process starts on them at once, with no
    claim of its own.
    """
    known, facts = _stored_and_facts(session, events)

    fresh: dict[str, EventData] = {}
    for event in events:
        if event.id in known:
            continue
        earlier = fresh.setdefault(event.id, event)
        _same_event(event, earlier.project_id, earlier.type)

    first: dict[str, PublishOutcome] = {}
    if fresh:
        first = _insert_fresh(
            session, list(fresh.values()), facts, now, dashboard_base_url, lease, published
        )
        # Rows leased to the publishing process need no other dispatcher.
        if any(outcome.delivery_count for outcome in first.values()) and (
            lease is None or published is None or published.left_due
        ):
            announce_due(session)

    outcomes: list[PublishOutcome] = []
    reported: set[str] = set()
    for event in events:
        if event.id in known:
            outcomes.append(known[event.id])
        elif event.id in reported:
            outcomes.append(_as_duplicate(first[event.id]))
        else:
            outcomes.append(first[event.id])
            reported.add(event.id)
    return outcomes


def _as_duplicate(outcome: PublishOutcome) -> PublishOutcome:
    return PublishOutcome(outcome.event_id, True, outcome.delivery_count, outcome.skip_reason)


#: Membership in the ids a SQLite statement gets as one JSON array.
_IN_JSON = "IN (SELECT value FROM json_each(?))"
_SELECT = "SELECT {columns} {rest}"


def _select_in(session: Transaction, sql: str, ids: Iterable[str]) -> list[Any]:
    """Rows of ``sql``, whose ``{ids}`` stands for membership in ``ids``, on the raw driver.

    The hot path of publishing skips SQLAlchemy's statement machinery, which costs more than
    these lookups themselves: SQLite gets the ids as one JSON array, PostgreSQL as an array.
    """
    values = sorted(set(ids))
    if not values:
        return []
    postgres = is_postgres(session)
    cursor = _cursor(session)
    try:
        if postgres:
            cursor.execute(sql.format(ids="= ANY(%s)"), (values,))
        else:
            cursor.execute(sql.format(ids=_IN_JSON), (json.dumps(values),))
        rows: list[Any] = cursor.fetchall()
    finally:
        cursor.close()
    return rows


def _same_event(event: EventData, project_id: str, event_type: str) -> None:
    """Refuse ``event`` when its id already names an event of another project or type."""
    if (event.project_id, event.type) != (project_id, event_type):
        raise AlreadyExists(
            f"The event id {event.id} is already taken by an event of another "
            f"{'project' if event.project_id != project_id else 'type'}; "
            "an event id names one event, so give this one a new id.",
            metadata={"event_id": event.id},
        )


def _stored_outcomes(
    session: Transaction, events: Sequence[EventData]
) -> dict[str, PublishOutcome]:
    """The outcomes of the events already stored, as duplicates.

    Raises ``AlreadyExists`` when a stored event with one of the ids is of another project
    or type: that is a different event, which dropping as a duplicate would lose (and
    receivers, who deduplicate on the id, would drop too). A repeat with another payload is
    a duplicate all the same: a retried call may carry, say, a later default time.
    """
    rows = _select_in(session, _STORED_EVENTS, dict.fromkeys(event.id for event in events))
    return _duplicates(events, rows)


def _duplicates(events: Sequence[EventData], rows: Sequence[Any]) -> dict[str, PublishOutcome]:
    """``_stored_outcomes`` from the rows read: (id, delivery count, skip reason, project,
    type) of each stored event."""
    stored = {row[0]: (row[3], row[4]) for row in rows}
    for event in events:
        if event.id in stored:
            _same_event(event, *stored[event.id])
    return {
        event_id: PublishOutcome(event_id, True, int(count), skip_reason)
        for event_id, count, skip_reason, _project, _type in rows
    }


@dataclass(frozen=True, slots=True)
class _ProjectFacts:
    info: ProjectInfo
    tier: Tier
    #: Published webhooks, oldest first: (webhook id, subscribed types, what a claim needs).
    subscribers: list[tuple[str, frozenset[str], _WebhookFacts]]


#: A project with its tier and its webhooks (archived ones aside), one row per webhook, oldest
#: first; a project without webhooks has one row with them NULL. ``_facts_of`` reads them.
_FACTS_COLUMNS = (
    "p.id, p.name, p.language, ws.tier, w.id, w.events, w.url, w.status, w.updated_at, "
    "w.disabled_reason, w.secret, w.previous_secret, w.previous_secret_expires_at"
)
_FACTS_FROM = (
    "FROM projects p JOIN workspaces ws ON ws.id = p.workspace_id "
    "LEFT JOIN webhooks w ON w.project_id = p.id AND w.status <> 'archived' WHERE p.id {ids}"
)
_PROJECT_FACTS = _SELECT.format(
    columns=_FACTS_COLUMNS, rest=_FACTS_FROM + " ORDER BY p.id, w.created_at, w.id"
)
#: A stored event, as ``_duplicates`` reads it.
_STORED_EVENT_COLUMNS = "id, delivery_count, skip_reason, project_id, type"
_STORED_EVENTS = _SELECT.format(columns=_STORED_EVENT_COLUMNS, rest="FROM events WHERE id {ids}")
#: The reads of a publishing transaction as one SQLite statement: the stored events (rows
#: marked 'e', padded to the width of the others), the facts of the projects not in memory
#: (rows marked 'p', with the webhook's ``created_at`` last, for the order: column 15, then
#: the id, column 6) and the directory's stamp (one row marked 'v').
_STORED_AND_FACTS = (
    "SELECT 'e', {events}, {padding} FROM events WHERE id {ids} "
    "UNION ALL SELECT 'p', {facts}, w.created_at {facts_from} "
    "UNION ALL SELECT 'v', version, {stamp_padding} FROM directory_version WHERE id = 1 "
    "ORDER BY 1, 2, 15, 6"
)
_STORED_AND_FACTS_SQLITE = _STORED_AND_FACTS.format(
    events=_STORED_EVENT_COLUMNS,
    padding=", ".join(["NULL"] * 9),
    facts=_FACTS_COLUMNS,
    facts_from=_FACTS_FROM.format(ids=_IN_JSON),
    stamp_padding=", ".join(["NULL"] * 13),
    ids=_IN_JSON,
)

#: How many projects, and how many webhooks, a connection keeps the facts of.
MAX_KEPT_FACTS = 4096


class DirectoryFacts:
    """What one connection last read of the directory, and the stamp it was read at.

    Facts read at the stamp a transaction reads are that transaction's facts: publishing
    and claiming read only the projects and webhooks they have not kept, and nothing at all
    of the directory while it stays unchanged. A new stamp forgets everything. Kept with
    the connection (SQLite's pool keeps it for the connection's life), so each database has
    its own; PostgreSQL's transactions read the facts each time.
    """

    __slots__ = ("hooks", "projects", "stamp")

    def __init__(self) -> None:
        self.stamp: int | None = None
        self.projects: dict[str, _ProjectFacts] = {}
        self.hooks: dict[str, _WebhookFacts] = {}

    def at(self, stamp: int | None) -> bool:
        """Move to ``stamp``, forgetting what was read at another; whether what is kept
        holds. Without a stamp (its row deleted by hand) nothing kept ever holds."""
        if stamp is not None and stamp == self.stamp:
            return True
        self.stamp = stamp
        self.projects = {}
        self.hooks = {}
        return False

    def keep_projects(self, facts: Mapping[str, _ProjectFacts]) -> None:
        if len(self.projects) + len(facts) > MAX_KEPT_FACTS:
            self.projects = {}
        self.projects.update(facts)
        self.keep_hooks(
            {
                webhook_id: hook
                for project in facts.values()
                for webhook_id, _types, hook in project.subscribers
            }
        )

    def keep_hooks(self, hooks: Mapping[str, _WebhookFacts]) -> None:
        if len(self.hooks) + len(hooks) > MAX_KEPT_FACTS:
            self.hooks = {}
        self.hooks.update(hooks)


_KEPT_FACTS = "dembrane.directory_facts"


def _kept_facts(session: Transaction) -> DirectoryFacts:
    """The ``DirectoryFacts`` of the transaction's connection."""
    if isinstance(session, DriverSession):
        info = session.info
    else:
        info = session.connection().connection.info
    kept = info.get(_KEPT_FACTS)
    if kept is None:
        kept = info[_KEPT_FACTS] = DirectoryFacts()
    return cast(DirectoryFacts, kept)


def _stored_and_facts(
    session: Transaction, events: Sequence[EventData]
) -> tuple[dict[str, PublishOutcome], dict[str, _ProjectFacts]]:
    """``_stored_outcomes`` of ``events`` and ``_project_facts`` of their projects.

    On SQLite in one statement, which reads only the facts not kept in memory and the
    stamp that says whether those kept still hold: each statement lets the interpreter lock
    go while SQLite works and then waits for the event loop to give it back, and the first
    of a transaction waits longest (the loop is busy with the call that just handed the
    transaction over).
    """
    if is_postgres(session):
        return (
            _stored_outcomes(session, events),
            _project_facts(session, (event.project_id for event in events)),
        )
    kept = _kept_facts(session)
    projects = {event.project_id for event in events}
    facts = {p: kept.projects[p] for p in projects if p in kept.projects}
    cursor = _cursor(session)
    try:
        cursor.execute(
            _STORED_AND_FACTS_SQLITE,
            (
                json.dumps(sorted({event.id for event in events})),
                json.dumps(sorted(projects - facts.keys())),
            ),
        )
        rows = cursor.fetchall()
    finally:
        cursor.close()
    stored = [row[1:6] for row in rows if row[0] == "e"]
    read = _facts_of(row[1:14] for row in rows if row[0] == "p")
    stamp = next((row[1] for row in rows if row[0] == "v"), None)
    if not kept.at(stamp) and facts:
        # What was kept is of another stamp: read it again, in this transaction (a project
        # deleted since is then unknown, as it should be).
        read.update(_project_facts(session, facts))
        facts = {}
    facts.update(read)
    kept.keep_projects(read)
    return _duplicates(events, stored), facts


def _project_facts(session: Transaction, project_ids: Iterable[str]) -> dict[str, _ProjectFacts]:
    """Each known project with its tier and its webhooks (archived ones aside), in one
    statement."""
    return _facts_of(_select_in(session, _PROJECT_FACTS, project_ids))


def _facts_of(rows: Iterable[Sequence[Any]]) -> dict[str, _ProjectFacts]:
    """``_project_facts`` from the rows read, in ``_PROJECT_FACTS``'s columns and order."""
    facts: dict[str, _ProjectFacts] = {}
    for project_id, name, language, tier, webhook_id, events, *hook in rows:
        project = facts.get(project_id)
        if project is None:
            project = facts[project_id] = _ProjectFacts(
                _project_info(project_id, name, language), _tier(tier), []
            )
        if webhook_id is not None:
            project.subscribers.append(
                (webhook_id, _subscribed_types(events), _hook_facts(*hook, tier))
            )
    return facts


# What the rows of the directory and webhooks read as, kept for the rows read again: every
# publishing transaction and claim reads the facts of each project and webhook it touches,
# and they seldom change. Each is a pure function of the values read, so a changed row is
# simply a new entry. Bounded, as rows are many over a process's life.


@functools.lru_cache(maxsize=4096)
def _project_info(project_id: str, name: str, language: str) -> ProjectInfo:
    return ProjectInfo(project_id, name, language)


@functools.lru_cache(maxsize=64)
def _tier(value: int) -> Tier:
    return Tier(value)


@functools.lru_cache(maxsize=1024)
def _subscribed_types(events: str) -> frozenset[str]:
    return frozenset(str(t) for t in json.loads(events))


@functools.lru_cache(maxsize=4096)
def _hook_facts(
    url: str,
    status: str,
    updated_at: float,
    disabled_reason: str,
    secret: str,
    previous_secret: str | None,
    previous_secret_expires_at: float | None,
    tier: int,
) -> _WebhookFacts:
    return _WebhookFacts(
        url=url,
        status=status,
        updated_at=float(updated_at),
        disabled_reason=disabled_reason,
        secret=secret,
        previous_secret=previous_secret,
        previous_secret_expires_at=previous_secret_expires_at,
        tier=_tier(tier),
    )


def _insert_fresh(
    session: Transaction,
    events: Sequence[EventData],
    facts: Mapping[str, _ProjectFacts],
    now: float,
    dashboard_base_url: str,
    lease: Lease | None = None,
    published: Published | None = None,
) -> dict[str, PublishOutcome]:
    unknown = sorted({e.project_id for e in events if e.project_id not in facts})
    if unknown:
        names = ", ".join(repr(p) for p in unknown)
        raise FailedPrecondition(
            f"Project {names} is unknown to the directory; "
            "upsert it through DirectoryService before publishing its events.",
            reason="PROJECT_UNKNOWN",
            metadata={"project_id": unknown[0]},
        )

    event_rows: list[dict[str, Any]] = []
    deliveries: dict[str, list[dict[str, Any]]] = {}
    outcomes: dict[str, PublishOutcome] = {}
    bodies: dict[str, bytes] = {}
    # SQLite's new rows enter the per-webhook index a second late (``index_new_deliveries``).
    indexed = is_postgres(session)
    # The loop runs once per event on the store's thread, which every publication waits
    # for: plain loops and counters, the states' values read once.
    for event in events:
        project = facts[event.project_id]
        # Rendered ahead on the event loop where it could be: only the project is left to add.
        body = body_of(event, project.info, dashboard_base_url)
        skip_reason = "" if tier_allows_webhooks(project.tier) else tier_skip_reason(project.tier)
        event_id = event.id
        event_type = event.type
        rows: list[dict[str, Any]] = []
        queued = failed = 0
        for webhook_id, types, hook in project.subscribers:
            if event_type not in types:
                continue
            status, error, skipped = _new_row_state(hook, skip_reason)
            if status == _PENDING:
                queued += 1
            elif status == _FAILED:
                failed += 1
            rows.append(
                {
                    "id": new_id("dlv"),
                    "event_id": event_id,
                    "webhook_id": webhook_id,
                    "event_type": event_type,
                    "status": status,
                    "attempt_count": 0,
                    "next_attempt_at": now if status == _PENDING else None,
                    "lease_owner": None,
                    "created_at": now,
                    "updated_at": now,
                    "last_attempt_at": None,
                    "last_status_code": None,
                    "last_error": error,
                    "skip_reason": skipped,
                    "webhook_indexed": indexed,
                }
            )
        deliveries[event_id] = rows
        bodies[event_id] = body
        outcomes[event_id] = PublishOutcome(
            event_id, False, queued, skip_reason, len(rows) - queued - failed, failed
        )
        event_rows.append(
            {
                "id": event.id,
                "type": event.type,
                "project_id": event.project_id,
                "occurred_at": _unix(event.occurred_at),
                "created_at": now,
                "body": body,
                "skip_reason": skip_reason,
                "delivery_count": queued,
            }
        )

    leased = _lease_rows(deliveries, lease, published, facts)

    if not is_postgres(session):
        # One process owns a SQLite database and this transaction read the ids above, so
        # no other publication can have stored them meanwhile: plain multi-row inserts.
        cursor = _cursor(session)
        _write_rows(cursor, _INSERT_EVENTS_SQLITE, [_EVENT_VALUES(r) for r in event_rows])
        delivery_rows = [row for rows in deliveries.values() for row in rows]
        if delivery_rows:
            _write_rows(
                cursor,
                _INSERT_DELIVERIES_SQLITE,
                [_DELIVERY_VALUES(r) for r in delivery_rows],
            )
        _claim_leased(leased, bodies, facts, published)
        return outcomes

    inserted = _insert_events_once(_orm(session), event_rows)
    if len(inserted) < len(event_rows):
        # Another transaction stored some of these ids between our read and our insert:
        # theirs is the first publication.
        raced = [row["id"] for row in event_rows if row["id"] not in inserted]
        outcomes.update(_stored_outcomes(session, raced))
    delivery_rows = [row for event_id in inserted for row in deliveries[event_id]]
    if delivery_rows:
        _orm(session).execute(_table("deliveries").insert(), delivery_rows)
    written = {row["id"] for row in delivery_rows}
    _claim_leased([row for row in leased if row["id"] in written], bodies, facts, published)
    return outcomes


def disabled_error(reason: str | None) -> str:
    """The error of a delivery not sent because its webhook is disabled for ``reason``."""
    cause = (reason or "disabled by the service").rstrip(".")
    return f"The webhook is disabled ({cause}), so the delivery was not sent."


#: The states' stored values, read once (each ``.value`` of an enum member is a lookup).
_PENDING = DeliveryState.PENDING.value
_FAILED = DeliveryState.FAILED.value
_SKIPPED = DeliveryState.SKIPPED.value


def _new_row_state(hook: _WebhookFacts, tier_skip: str) -> tuple[str, str, str]:
    """The state (its stored value), error and skip reason of a new delivery to ``hook``.

    A published webhook's row is pending. The others are recorded too, so the log shows
    every event a webhook missed: a disabled webhook's as failed (``RecoverWebhook`` can
    send them once it is published again), a paused one's as skipped, like those of a
    workspace below the webhook tier.
    """
    if tier_skip:
        return _SKIPPED, "", tier_skip
    if hook.status == "published":
        return _PENDING, "", ""
    if hook.status == "disabled":
        return _FAILED, disabled_error(hook.disabled_reason), ""
    skip = f"The webhook was {hook.status} when the event was published, so it was not sent."
    return _SKIPPED, "", skip


def _lease_rows(
    deliveries: Mapping[str, list[dict[str, Any]]],
    lease: Lease | None,
    published: Published | None,
    facts: Mapping[str, _ProjectFacts],
) -> list[dict[str, Any]]:
    """Mark up to the lease's limit of new pending rows as leased, and those of webhooks
    cooling down as due when the cool-down ends; count the rows not leased, and those of
    them the lease left out."""
    if lease is None or published is None:
        return []
    candidates = [row for rows in deliveries.values() for row in rows if row["status"] == _PENDING]
    eligible = [row for row in candidates if row["webhook_id"] not in lease.excluded]
    if lease.quota is not None:
        within = set(lease.quota.pick((row["id"], row["webhook_id"]) for row in eligible))
        eligible = [row for row in eligible if row["id"] in within]
    leased = eligible[: lease.limit]
    for row in leased:
        row["next_attempt_at"] = lease.until
        row["lease_owner"] = lease.owner
    if lease.excluded:
        # The webhooks left out as the dispatcher saw them. Not one a person changed since
        # (a new address, a new status): as with claims, its rows are due at once, for the
        # dispatcher to learn of the change.
        unchanged = {
            webhook_id
            for project in facts.values()
            for webhook_id, _types, hook in project.subscribers
            if lease.excluded.get(webhook_id) == hook.updated_at
        }
        for row in candidates:
            webhook_id = row["webhook_id"]
            if webhook_id not in unchanged:
                continue
            published.left_out += 1
            held_until = lease.held_until.get(webhook_id)
            if held_until is not None:
                row["next_attempt_at"] = max(row["next_attempt_at"], held_until)
    published.left_due += len(candidates) - len(leased)
    return leased


def _claim_leased(
    leased: list[dict[str, Any]],
    bodies: dict[str, bytes],
    facts: Mapping[str, _ProjectFacts],
    published: Published | None,
) -> None:
    if not leased or published is None:
        return
    hooks = {
        webhook_id: hook
        for project in facts.values()
        for webhook_id, _types, hook in project.subscribers
    }
    published.claims.extend(
        _claims(
            [
                (r["id"], r["event_id"], r["event_type"], r["webhook_id"], r["attempt_count"], 0)
                for r in leased
            ],
            bodies,
            hooks,
        )
    )


_EVENT_COLUMNS = (
    "id",
    "type",
    "project_id",
    "occurred_at",
    "created_at",
    "body",
    "skip_reason",
    "delivery_count",
)
_DELIVERY_COLUMNS = (
    "id",
    "event_id",
    "webhook_id",
    "event_type",
    "status",
    "attempt_count",
    "next_attempt_at",
    "lease_owner",
    "created_at",
    "updated_at",
    "last_attempt_at",
    "last_status_code",
    "last_error",
    "skip_reason",
    "webhook_indexed",
)
# Multi-row inserts; see ``_write_rows``.
# Built from the constant column tuples above, never from input (hence the noqa).
_INSERT_EVENTS_SQLITE = f"INSERT INTO events ({', '.join(_EVENT_COLUMNS)}) VALUES {{values}}"  # noqa: S608
_INSERT_DELIVERIES_SQLITE = (
    f"INSERT INTO deliveries ({', '.join(_DELIVERY_COLUMNS)}) VALUES {{values}}"  # noqa: S608
)


# A row's values in its table's column order (itemgetter does it in C: a few per event).
_EVENT_VALUES = operator.itemgetter(*_EVENT_COLUMNS)
_DELIVERY_VALUES = operator.itemgetter(*_DELIVERY_COLUMNS)


def _insert_events_once(session: Session, rows: list[dict[str, Any]]) -> set[str]:
    """Insert event rows, ignoring ids that exist; return the ids actually inserted."""
    events = _table("events")
    dialect = postgresql if is_postgres(session) else sqlite
    # One cached statement executed for many rows ("insertmanyvalues" batches them into
    # multi-row INSERTs with RETURNING): a VALUES list built per call would be compiled anew.
    statement = (dialect.insert(events).on_conflict_do_nothing(index_elements=["id"])).returning(
        events.c.id
    )
    return set(session.execute(statement, rows).scalars())


def _unix(moment: datetime) -> float:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


# -- claiming -----------------------------------------------------------------------------


@dataclass(slots=True)
class DeliveryClaim:
    """A delivery leased to one dispatcher, with everything needed to send it.

    Nothing changes a claim once made. It is not a frozen dataclass all the same: one is made
    per delivery on the store's thread, and a frozen dataclass sets each of its fields through
    ``object.__setattr__``, which doubled the time to make one.
    """

    delivery_id: str
    event_id: str
    event_type: str
    webhook_id: str
    attempt_count: int
    #: Attempts lost with a sender process so far; they count in the log's numbering.
    lost_attempts: int
    body: bytes
    url: str
    webhook_status: str
    #: When the webhook was last changed, by a person or by the service.
    webhook_updated_at: float
    disabled_reason: str
    secret: str
    previous_secret: str | None
    previous_secret_expires_at: float | None
    tier: Tier

    def secrets(self, now: float) -> tuple[str, ...]:
        """The secrets to sign with: the current one, and the previous during its grace."""
        return signing_secrets(
            self.secret, self.previous_secret, self.previous_secret_expires_at, now
        )


# The hot statements run on the driver's own cursor with fixed SQL per dialect (the note
# the module's docstring points to): the
# dispatcher runs them for every delivery, and SQLAlchemy's statement machinery (parameter
# processing per row, result objects) costs more than the statements themselves.
#
# On SQLite the number of statement steps matters more than their size: the driver lets the
# interpreter lock go around every step (each row read, each row of an ``executemany``),
# and getting it back waits for the event loop thread to yield it. So reads of many rows
# come back as one JSON array in one row, id lists go in as one JSON array
# (``json_each``), and writes of many rows are multi-row statements. Floats are never sent
# through JSON, whose text form would round them. psycopg takes ``%s`` parameters, binds
# lists as arrays, and reads a whole result at once, so PostgreSQL keeps plain statements.

#: The most webhooks a claim leaves out; beyond that their rows are claimed and handed back.
MAX_EXCLUDED = 200
#: The most rows of one multi-row SQLite statement: it keeps the bound variables (rows
#: times columns) well under SQLite's limit of 32,766.
_MAX_VALUES_ROWS = 1024


def _cursor(session: Transaction) -> Any:
    """A DBAPI cursor on the session's connection, inside the session's transaction."""
    if isinstance(session, DriverSession):
        return session.cursor()
    return session.connection().connection.cursor()


def _json_list(cursor: Any) -> list[Any]:
    row = cursor.fetchone()
    return [] if row is None or row[0] is None else list(json.loads(row[0]))


def _json_list_of_bytes(value: bytes | None) -> list[Any]:
    """A JSON array that carries byte strings as JSON strings, read as a BLOB.

    SQLite puts a BLOB cast to TEXT into JSON as it is, escaping only quotes, backslashes
    and control characters; bytes that are not UTF-8 pass through unchanged. Read as bytes
    and decoded with ``surrogateescape``, such a string's ``encode("utf-8",
    "surrogateescape")`` gives back the exact bytes, whatever they are (bodies are ASCII).
    """
    if value is None:
        return []
    return list(json.loads(bytes(value).decode("utf-8", "surrogateescape")))


@functools.lru_cache(maxsize=512)
def _values_sql(template: str, width: int, count: int) -> str:
    row = "(" + ", ".join("?" * width) + ")"
    return template.format(values=", ".join([row] * count))


def _write_rows(
    cursor: Any, template: str, rows: Sequence[Sequence[Any]], extra: Sequence[Any] = ()
) -> None:
    """Run a SQLite ``template`` whose ``{values}`` takes ``rows``; ``extra`` parameters
    follow the rows' in every statement.

    Each statement takes a power of two of the rows, the largest that is left (100 rows are
    64, 32 and 4): a few statement shapes stay compiled, a batch takes a few statements at
    most, and no statement carries rows that are not there. Padding a batch up to a fixed
    size instead cost more than the rows themselves: 100 deliveries padded to 256 took three
    times as long to insert as in three exact statements.
    """
    width = len(rows[0])
    start = 0
    while start < len(rows):
        size = min(_MAX_VALUES_ROWS, 1 << ((len(rows) - start).bit_length() - 1))
        params = [value for row in rows[start : start + size] for value in row]
        params.extend(extra)
        cursor.execute(_values_sql(template, width, size), params)
        start += size


_DUE_SQLITE = (
    "SELECT json_group_array(json_array(id, webhook_id)) FROM (SELECT id, webhook_id "
    "FROM deliveries WHERE status = 'pending' AND next_attempt_at <= ?{skip} "
    "ORDER BY next_attempt_at LIMIT ?)"
)
# Rows of the webhooks left out, unless the webhook changed since the dispatcher looked
# (a new address, a new status): the pairs are (webhook id, ``updated_at`` it saw).
_SKIP_SQLITE = (
    " AND webhook_id NOT IN (SELECT w.id FROM webhooks w JOIN (VALUES {values}) AS x "
    "ON w.id = x.column1 AND w.updated_at = x.column2)"
)
_SKIP_POSTGRES = (
    " AND webhook_id NOT IN (SELECT w.id FROM webhooks w "
    "JOIN unnest(%s::text[], %s::float8[]) AS x(id, seen) "
    "ON w.id = x.id AND w.updated_at = x.seen)"
)
_LEASE_SQLITE = (
    "UPDATE deliveries SET next_attempt_at = ?, lease_owner = ? "
    "WHERE id IN (SELECT value FROM json_each(?)) "
    "AND status = 'pending' AND next_attempt_at <= ?"
)
# The rows this claim leased: among the chosen ids, those now leased to the owner until
# the claim's lease end (a row that was due cannot carry that lease end otherwise).
# Bodies travel as JSON strings of their bytes (see ``_json_list_of_bytes``): half the time
# of hex digits, which a claim of 256 rows spent most of its time writing and reading.
# The directory's stamp comes along, for the webhooks' facts kept in memory.
_LEASED_SQLITE = (
    "SELECT CAST(json_group_array(json_array(d.id, d.event_id, d.event_type, d.webhook_id, "
    "d.attempt_count, d.lost_attempts, CAST(e.body AS TEXT))) AS BLOB), "
    "(SELECT version FROM directory_version WHERE id = 1) "
    "FROM deliveries d JOIN events e ON e.id = d.event_id "
    "WHERE d.id IN (SELECT value FROM json_each(?)) "
    "AND d.lease_owner = ? AND d.next_attempt_at = ?"
)
_WEBHOOKS = (
    "SELECT w.id, w.url, w.status, w.updated_at, w.disabled_reason, w.secret, "
    "w.previous_secret, w.previous_secret_expires_at, ws.tier "
    "FROM webhooks w "
    "JOIN projects p ON p.id = w.project_id "
    "JOIN workspaces ws ON ws.id = p.workspace_id "
    "WHERE w.id {match}"
)
_WEBHOOKS_SQLITE = _WEBHOOKS.format(match="IN (SELECT value FROM json_each(?))")
_WEBHOOKS_POSTGRES = _WEBHOOKS.format(match="= ANY(%s)")
_CLAIM_POSTGRES = (
    "UPDATE deliveries SET next_attempt_at = %s, lease_owner = %s WHERE id IN ("
    "SELECT id FROM deliveries WHERE status = 'pending' AND next_attempt_at <= %s{skip} "
    "ORDER BY next_attempt_at LIMIT %s FOR UPDATE SKIP LOCKED) "
    "RETURNING id, event_id, event_type, webhook_id, attempt_count, lost_attempts"
)
# With a quota: lock the due rows first, then lease those within it (the others stay due).
_DUE_POSTGRES = (
    "SELECT id, webhook_id FROM deliveries WHERE status = 'pending' AND next_attempt_at <= %s"
    "{skip} ORDER BY next_attempt_at LIMIT %s FOR UPDATE SKIP LOCKED"
)
_LEASE_POSTGRES = (
    "UPDATE deliveries SET next_attempt_at = %s, lease_owner = %s WHERE id = ANY(%s) "
    "RETURNING id, event_id, event_type, webhook_id, attempt_count, lost_attempts"
)
_BODIES_POSTGRES = "SELECT id, body FROM events WHERE id = ANY(%s)"
_NEXT_DUE = "SELECT MIN(next_attempt_at) FROM deliveries WHERE status = 'pending'"
# With webhooks left out, walk the due index in order and stop at the first row that counts.
_NEXT_DUE_SKIPPING = (
    "SELECT next_attempt_at FROM deliveries WHERE status = 'pending'{skip} "
    "ORDER BY next_attempt_at LIMIT 1"
)


def _skipping(postgres: bool, excluded: Mapping[str, float] | None) -> tuple[str, list[Any]]:
    """The claim's clause leaving out ``excluded`` and its parameters ("" when none)."""
    if not excluded:
        return "", []
    pairs = sorted(excluded.items())[:MAX_EXCLUDED]
    if postgres:
        return _SKIP_POSTGRES, [[p[0] for p in pairs], [p[1] for p in pairs]]
    clause = _values_sql(_SKIP_SQLITE, 2, len(pairs))
    return clause, [value for pair in pairs for value in pair]


@dataclass(frozen=True, slots=True)
class _WebhookFacts:
    url: str
    status: str
    updated_at: float
    disabled_reason: str
    secret: str
    previous_secret: str | None
    previous_secret_expires_at: float | None
    tier: Tier


def _webhook_facts(cursor: Any, postgres: bool, webhook_ids: set[str]) -> dict[str, _WebhookFacts]:
    ids = sorted(webhook_ids)
    if postgres:
        cursor.execute(_WEBHOOKS_POSTGRES, (ids,))
    else:
        cursor.execute(_WEBHOOKS_SQLITE, (json.dumps(ids),))
    return {row[0]: _hook_facts(*row[1:]) for row in cursor.fetchall()}


def _kept_webhook_facts(
    session: Transaction, cursor: Any, stamp: int | None, webhook_ids: set[str]
) -> dict[str, _WebhookFacts]:
    """The facts of ``webhook_ids`` at the directory's ``stamp`` (read in this transaction),
    reading only those not kept in memory (SQLite)."""
    kept = _kept_facts(session)
    kept.at(stamp)
    missing = webhook_ids - kept.hooks.keys()
    if missing:
        kept.keep_hooks(_webhook_facts(cursor, False, missing))
    return kept.hooks


def _claims(
    deliveries: Sequence[Sequence[Any]],
    bodies: Mapping[str, bytes],
    hooks: Mapping[str, _WebhookFacts],
) -> list[DeliveryClaim]:
    claims = []
    for delivery_id, event_id, event_type, webhook_id, attempt_count, lost in deliveries:
        hook = hooks.get(webhook_id)
        body = bodies.get(event_id)
        if hook is None or body is None:
            continue  # deleted meanwhile (only a cascade can do that)
        claims.append(
            DeliveryClaim(
                delivery_id=delivery_id,
                event_id=event_id,
                event_type=event_type,
                webhook_id=webhook_id,
                attempt_count=int(attempt_count),
                lost_attempts=int(lost),
                body=body,
                url=hook.url,
                webhook_status=hook.status,
                webhook_updated_at=hook.updated_at,
                disabled_reason=hook.disabled_reason,
                secret=hook.secret,
                previous_secret=hook.previous_secret,
                previous_secret_expires_at=hook.previous_secret_expires_at,
                tier=hook.tier,
            )
        )
    return claims


def claim_due(
    session: Transaction,
    owner: str,
    now: float,
    lease_seconds: float,
    limit: int,
    *,
    excluded: Mapping[str, float] | None = None,
    quota: Quota | None = None,
) -> list[DeliveryClaim]:
    """Lease up to ``limit`` due deliveries to ``owner``, oldest due first, and return them.

    A leased row stays pending with ``next_attempt_at`` at the lease's end: if its owner
    never finishes it (a crash), it simply comes due again then. Rows of the webhooks in
    ``excluded`` (webhook id to the ``updated_at`` the caller saw; at most ``MAX_EXCLUDED``
    count) are left where they are, unless the webhook changed since: the dispatcher names
    the webhooks it cannot send to now. With a ``quota``, due rows beyond a webhook's room
    are left due too, so fewer than ``limit`` may come back while more are due.
    ``lease_seconds`` must be positive.
    """
    if limit <= 0:
        return []
    lease_until = now + lease_seconds
    postgres = is_postgres(session)
    skip, skip_params = _skipping(postgres, excluded)
    cursor = _cursor(session)
    try:
        if postgres:
            deliveries = _lease_due_postgres(
                cursor, owner, now, lease_until, limit, skip, skip_params, quota
            )
            if not deliveries:
                return []
            event_ids = sorted({row[1] for row in deliveries})
            cursor.execute(_BODIES_POSTGRES, (event_ids,))
            bodies = {row[0]: bytes(row[1]) for row in cursor.fetchall()}
            hooks = _webhook_facts(cursor, postgres, {row[3] for row in deliveries})
        else:
            cursor.execute(_DUE_SQLITE.format(skip=skip), (now, *skip_params, limit))
            pairs = _json_list(cursor)
            due = [p[0] for p in pairs] if quota is None else quota.pick(pairs)
            if not due:
                return []
            chosen = json.dumps(due)
            cursor.execute(_LEASE_SQLITE, (lease_until, owner, chosen, now))
            cursor.execute(_LEASED_SQLITE, (chosen, owner, lease_until))
            found, stamp = cursor.fetchone()
            leased = _json_list_of_bytes(found)
            if not leased:
                return []
            # Oldest due first, as chosen; the join returns rows in any order.
            position = {delivery_id: index for index, delivery_id in enumerate(due)}
            leased.sort(key=lambda row: position[row[0]])
            deliveries = [row[:6] for row in leased]
            bodies = {row[1]: row[6].encode("utf-8", "surrogateescape") for row in leased}
            hooks = _kept_webhook_facts(session, cursor, stamp, {row[3] for row in deliveries})
    finally:
        cursor.close()
    return _claims(deliveries, bodies, hooks)


def _lease_due_postgres(
    cursor: Any,
    owner: str,
    now: float,
    lease_until: float,
    limit: int,
    skip: str,
    skip_params: list[Any],
    quota: Quota | None,
) -> list[Any]:
    """Lease due rows on PostgreSQL; the rows ``(id, event_id, event_type, webhook_id,
    attempt_count, lost_attempts)``, oldest due first."""
    if quota is None:
        cursor.execute(
            _CLAIM_POSTGRES.format(skip=skip), (lease_until, owner, now, *skip_params, limit)
        )
        return list(cursor.fetchall())
    cursor.execute(_DUE_POSTGRES.format(skip=skip), (now, *skip_params, limit))
    chosen = quota.pick(cursor.fetchall())
    if not chosen:
        return []
    cursor.execute(_LEASE_POSTGRES, (lease_until, owner, chosen))
    order = {delivery_id: index for index, delivery_id in enumerate(chosen)}
    return sorted(cursor.fetchall(), key=lambda row: order[row[0]])


def next_due_time(
    session: Transaction, excluded: Mapping[str, float] | None = None
) -> float | None:
    """When the earliest pending delivery is due (leased ones at their lease's end).

    Rows of the webhooks in ``excluded`` (as ``claim_due`` counts them) are not looked at.
    """
    skip, skip_params = _skipping(is_postgres(session), excluded)
    cursor = _cursor(session)
    try:
        if skip:
            cursor.execute(_NEXT_DUE_SKIPPING.format(skip=skip), skip_params)
        else:
            cursor.execute(_NEXT_DUE)
        row = cursor.fetchone()
    finally:
        cursor.close()
    value = None if row is None else row[0]
    return None if value is None else float(value)


def release_stale_leases(session: Session, now: float) -> int:
    """Make every leased delivery due now; for a store only one dispatcher uses (SQLite).

    A dispatcher starting on SQLite knows that every lease belongs to a process that is
    gone, so it need not wait for those leases to run out.
    """
    result = session.execute(
        text(
            "UPDATE deliveries SET next_attempt_at = :now, lease_owner = NULL "
            "WHERE status = 'pending' AND next_attempt_at > :now AND lease_owner IS NOT NULL"
        ),
        {"now": now},
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


# -- recording outcomes -------------------------------------------------------------------


@dataclass(slots=True)
class AttemptRecord:
    """One HTTP request made for a delivery, as the log keeps it.

    Not frozen, though nothing changes one (nor a ``DeliveryResult``): both are made per
    request on the event loop, and a frozen dataclass's constructor takes twice as long.
    """

    number: int
    attempted_at: float
    status_code: int | None
    latency_ms: float
    response_body: str
    error: str
    success: bool
    #: The service lost the request itself (its worker process stopped, or stopping cut it
    #: off): it says nothing of the receiver, so it leaves the webhook's run of failures
    #: alone. Not stored: in the log it is a failed attempt without an answer.
    lost: bool = False


@dataclass(slots=True)
class DeliveryResult:
    """What a dispatcher learned about a leased delivery: attempts made, and where it stands.

    ``attempts`` is empty when nothing was sent (the webhook was paused or disabled, or the
    workspace's tier dropped). ``disable_reason`` disables the webhook (a 410 answer).
    """

    delivery_id: str
    webhook_id: str
    status: DeliveryState
    attempt_count: int
    next_attempt_at: float | None = None
    attempts: tuple[AttemptRecord, ...] = ()
    #: The delivery's lost attempts with these ``attempts``; written when attempts are.
    lost_attempts: int = 0
    last_error: str = ""
    skip_reason: str = ""
    disable_reason: str | None = None


@dataclass(frozen=True, slots=True)
class Release:
    """A leased delivery handed back unsent, due again at ``next_attempt_at``."""

    delivery_id: str
    next_attempt_at: float


@dataclass
class RecordEffects:
    """What recording a batch changed beyond the deliveries themselves."""

    #: Webhooks this batch disabled, with the reason stored on them.
    disabled: dict[str, str] = field(default_factory=dict)
    #: Results and releases dropped because their row was leased to another dispatcher.
    stale: int = 0
    #: Results and releases dropped because their row was deleted (with its webhook).
    gone: int = 0


@dataclass(frozen=True, slots=True)
class HoldBack:
    """A webhook whose receiver is unwell: its unleased rows due before ``until`` wait."""

    webhook_id: str
    until: float


def _for_postgres(sql: str) -> str:
    return sql.replace("?", "%s")


_INSERT_ATTEMPTS = (
    "INSERT INTO attempts (delivery_id, number, attempted_at, status_code, latency_ms, "
    "response_body, error, success) VALUES {values}"
)
_INSERT_ATTEMPT_POSTGRES = _INSERT_ATTEMPTS.format(values="(%s, %s, %s, %s, %s, %s, %s, %s)")
# Row parameters: id, status, attempt_count, next_attempt_at, last_attempt_at,
# last_status_code, last_error, updated_at, lost_attempts; then the owner. (SQLite numbers
# ``?`` in the order they appear, so parameters of the SET clause cannot follow the rows'.)
_FINISH_ATTEMPTED_SQLITE = (
    "UPDATE deliveries SET status = v.column2, attempt_count = v.column3, "
    "next_attempt_at = v.column4, lease_owner = NULL, updated_at = v.column8, "
    "last_attempt_at = v.column5, last_status_code = v.column6, last_error = v.column7, "
    "lost_attempts = v.column9 "
    "FROM (VALUES {values}) AS v WHERE deliveries.id = v.column1 AND deliveries.lease_owner = ?"
)
_FINISH_ATTEMPTED_POSTGRES = (
    "UPDATE deliveries SET status = %s, attempt_count = %s, next_attempt_at = %s, "
    "lease_owner = NULL, updated_at = %s, last_attempt_at = %s, last_status_code = %s, "
    "last_error = %s, lost_attempts = %s WHERE id = %s AND lease_owner = %s"
)
_FINISH_UNSENT = (
    "UPDATE deliveries SET status = ?, next_attempt_at = ?, lease_owner = NULL, "
    "updated_at = ?, last_error = ?, skip_reason = ? WHERE id = ? AND lease_owner = ?"
)
# Row parameters: id, next_attempt_at; then the owner.
_RELEASE_SQLITE = (
    "UPDATE deliveries SET next_attempt_at = v.column2, lease_owner = NULL "
    "FROM (VALUES {values}) AS v WHERE deliveries.id = v.column1 AND deliveries.lease_owner = ?"
)
_RELEASE_POSTGRES = (
    "UPDATE deliveries SET next_attempt_at = %s, lease_owner = NULL "
    "WHERE id = %s AND lease_owner = %s"
)
_HOLD_BACK_SQLITE = (
    "UPDATE deliveries SET next_attempt_at = ? WHERE webhook_id = ? AND status = 'pending' "
    "AND lease_owner IS NULL AND next_attempt_at < ?"
)
# Replicas whose breakers open for the same webhook hold back the same rows: each skips the
# rows another has locked (that one holds them back) instead of waiting, so two never wait
# for each other's locks (a deadlock that failed the whole batch of outcomes).
_HOLD_BACK_POSTGRES = (
    "UPDATE deliveries SET next_attempt_at = %s WHERE id IN (SELECT id FROM deliveries "
    "WHERE webhook_id = %s AND status = 'pending' AND lease_owner IS NULL "
    "AND next_attempt_at < %s FOR UPDATE SKIP LOCKED)"
)
# A webhook's start of failures is written only when it changes: most flushes see webhooks
# that were succeeding already, and rewriting their rows would cost a write each.
# Row parameters: webhook id, failing_since.
_RECOVERED_SQLITE = (
    "UPDATE webhooks SET failing_since = v.column2 FROM (VALUES {values}) AS v "
    "WHERE webhooks.id = v.column1 AND webhooks.failing_since IS NOT v.column2"
)
_RECOVERED_POSTGRES = (
    "UPDATE webhooks SET failing_since = %s WHERE id = %s AND failing_since IS DISTINCT FROM %s"
)
_FAILING_SQLITE = (
    "UPDATE webhooks SET failing_since = v.column2 FROM (VALUES {values}) AS v "
    "WHERE webhooks.id = v.column1 AND webhooks.failing_since IS NULL"
)
_FAILING_POSTGRES = "UPDATE webhooks SET failing_since = %s WHERE id = %s AND failing_since IS NULL"
_DISABLE = (
    "UPDATE webhooks SET status = 'disabled', disabled_reason = ?, updated_at = ? "
    "WHERE id = ? AND status = 'published'"
)
_DISABLE_FAILING_SQLITE = (
    "UPDATE webhooks SET status = 'disabled', disabled_reason = ?, updated_at = ? "
    "WHERE id IN (SELECT value FROM json_each(?)) AND status = 'published' "
    "AND failing_since IS NOT NULL AND failing_since <= ? RETURNING id"
)
_DISABLE_FAILING_POSTGRES = (
    "UPDATE webhooks SET status = 'disabled', disabled_reason = %s, updated_at = %s "
    "WHERE id = ANY(%s) AND status = 'published' "
    "AND failing_since IS NOT NULL AND failing_since <= %s RETURNING id"
)
_OWNED_SQLITE = (
    "SELECT json_group_array(id) FROM deliveries "
    "WHERE lease_owner = ? AND id IN (SELECT value FROM json_each(?))"
)
_OWNED_POSTGRES = "SELECT id FROM deliveries WHERE lease_owner = %s AND id = ANY(%s) FOR UPDATE"


def _owned(cursor: Any, postgres: bool, owner: str, ids: list[str]) -> set[str]:
    """The ids still leased to ``owner``; on PostgreSQL locked until the commit."""
    if postgres:
        cursor.execute(_OWNED_POSTGRES, (owner, ids))
        return {row[0] for row in cursor.fetchall()}
    cursor.execute(_OWNED_SQLITE, (owner, json.dumps(ids)))
    return set(_json_list(cursor))


def record_results(
    session: Transaction,
    owner: str,
    results: Sequence[DeliveryResult],
    releases: Sequence[Release],
    now: float,
    disable_after_seconds: float,
    holds: Sequence[HoldBack] = (),
) -> RecordEffects:
    """Record a batch of outcomes and releases of deliveries leased to ``owner``.

    Rows no longer leased to ``owner`` are left alone (their lease ran out and someone else
    has them). Webhooks keep the start of their current run of failures; one failing for
    ``disable_after_seconds`` without a success, or answering 410, is disabled. Each of
    ``holds`` makes its webhook's unleased pending rows due no sooner than its ``until``.
    """
    effects = RecordEffects()
    ids = [r.delivery_id for r in results] + [r.delivery_id for r in releases]
    if not ids and not holds:
        return effects
    postgres = is_postgres(session)
    cursor = _cursor(session)
    try:
        if ids:
            # One read finds the rows still ours; on PostgreSQL it also locks them, so no
            # other dispatcher can lease them between this check and the writes below.
            owned = _owned(cursor, postgres, owner, ids)
            if len(owned) < len(ids):
                results = [r for r in results if r.delivery_id in owned]
                releases = [r for r in releases if r.delivery_id in owned]
                missing = [i for i in ids if i not in owned]
                still_there = _select_in(
                    session, "SELECT id FROM deliveries WHERE id {ids}", missing
                )
                effects.stale = len(still_there)
                effects.gone = len(missing) - len(still_there)
            attempted = [r for r in results if r.attempts]
            _write_outcomes(cursor, postgres, owner, results, attempted, releases, now)
            _track_failures(cursor, postgres, attempted, now, disable_after_seconds, effects)
        if holds:
            hold_back = _HOLD_BACK_POSTGRES if postgres else _HOLD_BACK_SQLITE
            cursor.executemany(
                hold_back, [(hold.until, hold.webhook_id, hold.until) for hold in holds]
            )
    finally:
        cursor.close()
    return effects


def _write_outcomes(
    cursor: Any,
    postgres: bool,
    owner: str,
    results: Sequence[DeliveryResult],
    attempted: Sequence[DeliveryResult],
    releases: Sequence[Release],
    now: float,
) -> None:
    if attempted:
        attempt_rows = [
            (
                result.delivery_id,
                attempt.number,
                attempt.attempted_at,
                attempt.status_code,
                attempt.latency_ms,
                attempt.response_body,
                _clip(attempt.error, ERROR_MAX),
                attempt.success,
            )
            for result in attempted
            for attempt in result.attempts
        ]
        finished = [
            (
                r.delivery_id,
                r.status.value,
                r.attempt_count,
                r.next_attempt_at,
                r.attempts[-1].attempted_at,
                r.attempts[-1].status_code,
                _clip(r.last_error, ERROR_MAX),
                now,
                r.lost_attempts,
            )
            for r in attempted
        ]
        if postgres:
            cursor.executemany(_INSERT_ATTEMPT_POSTGRES, attempt_rows)
            cursor.executemany(
                _FINISH_ATTEMPTED_POSTGRES,
                [(*row[1:4], now, *row[4:7], row[8], row[0], owner) for row in finished],
            )
        else:
            _write_rows(cursor, _INSERT_ATTEMPTS, attempt_rows)
            _write_rows(cursor, _FINISH_ATTEMPTED_SQLITE, finished, (owner,))
    if len(attempted) < len(results):
        # Rows finished unsent (a paused or disabled webhook, a tier without webhooks).
        cursor.executemany(
            _for_postgres(_FINISH_UNSENT) if postgres else _FINISH_UNSENT,
            [
                (
                    r.status.value,
                    r.next_attempt_at,
                    now,
                    _clip(r.last_error, ERROR_MAX),
                    _clip(r.skip_reason, _REASON_MAX),
                    r.delivery_id,
                    owner,
                )
                for r in results
                if not r.attempts
            ],
        )
    if releases:
        if postgres:
            cursor.executemany(
                _RELEASE_POSTGRES, [(r.next_attempt_at, r.delivery_id, owner) for r in releases]
            )
        else:
            _write_rows(
                cursor,
                _RELEASE_SQLITE,
                [(r.delivery_id, r.next_attempt_at) for r in releases],
                (owner,),
            )


def replay_outcomes(
    session: Transaction,
    entries: Sequence[tuple[str, DeliveryResult]],
    now: float,
    disable_after_seconds: float,
) -> int:
    """Record outcomes a dispatcher that stopped without writing them kept elsewhere (its
    journal), each ``(owner, result)``; returns how many were recorded.

    A result counts only while its row is still pending, leased to the dispatcher that made
    the attempt, and has no later attempt recorded: the number of its first attempt follows
    the row's recorded ones. So an outcome the store already has, or one overtaken since, is
    never written again, and replaying the same entries twice changes nothing.
    """
    ids = {result.delivery_id for _owner, result in entries}
    found = {
        row[0]: (row[1], row[2], int(row[3]) + int(row[4]))
        for row in _select_in(
            session,
            "SELECT id, lease_owner, status, attempt_count, lost_attempts "
            "FROM deliveries WHERE id {ids}",
            ids,
        )
    }
    by_owner: dict[str, list[DeliveryResult]] = {}
    for owner, result in entries:
        row = found.get(result.delivery_id)
        if row is None or not result.attempts:
            continue
        lease_owner, status, recorded = row
        if (
            status != DeliveryState.PENDING
            or lease_owner != owner
            or result.attempts[0].number != recorded + 1
        ):
            continue
        by_owner.setdefault(owner, []).append(result)
        # A second outcome of the same row in the journal came after a lease this store
        # never saw written; the row is no longer leased once the first is recorded.
        found[result.delivery_id] = (None, status, recorded)
    for owner, results in by_owner.items():
        record_results(session, owner, results, [], now, disable_after_seconds)
    return sum(len(results) for results in by_owner.values())


def _track_failures(
    cursor: Any,
    postgres: bool,
    attempted: Sequence[DeliveryResult],
    now: float,
    disable_after_seconds: float,
    effects: RecordEffects,
) -> None:
    """Keep each webhook's ``failing_since`` and disable the ones that must stop.

    Lost attempts count neither way: the service cut them short, not the receiver.
    """
    last_success: dict[str, float] = {}
    failed_any = False
    for result in attempted:
        for attempt in result.attempts:
            if attempt.success:
                seen = last_success.get(result.webhook_id)
                if seen is None or attempt.attempted_at > seen:
                    last_success[result.webhook_id] = attempt.attempted_at
            elif not attempt.lost:
                failed_any = True
    # The first failure after the webhook's last success in this batch (or at all).
    first_failure: dict[str, float] = {}
    if failed_any:
        for result in attempted:
            after = last_success.get(result.webhook_id)
            for attempt in result.attempts:
                if (
                    attempt.success
                    or attempt.lost
                    or (after is not None and attempt.attempted_at <= after)
                ):
                    continue
                seen = first_failure.get(result.webhook_id)
                if seen is None or attempt.attempted_at < seen:
                    first_failure[result.webhook_id] = attempt.attempted_at

    recovered = [(wid, first_failure.get(wid)) for wid in sorted(last_success)]
    failing = [
        (wid, since) for wid, since in sorted(first_failure.items()) if wid not in last_success
    ]
    if postgres:
        if recovered:
            cursor.executemany(
                _RECOVERED_POSTGRES, [(since, wid, since) for wid, since in recovered]
            )
        if failing:
            cursor.executemany(_FAILING_POSTGRES, [(since, wid) for wid, since in failing])
    else:
        if recovered:
            _write_rows(cursor, _RECOVERED_SQLITE, recovered)
        if failing:
            _write_rows(cursor, _FAILING_SQLITE, failing)

    gone = {r.webhook_id: r.disable_reason for r in attempted if r.disable_reason}
    disable = _for_postgres(_DISABLE) if postgres else _DISABLE
    for webhook_id, reason in sorted(gone.items()):
        if not reason:
            continue
        cursor.execute(disable, (_clip(reason, _REASON_MAX), now, webhook_id))
        if rows_changed(cursor) > 0:
            effects.disabled[webhook_id] = reason
    candidates = sorted(set(first_failure) - set(effects.disabled))
    if candidates and disable_after_seconds > 0:
        days = disable_after_seconds / 86400
        reason = (
            f"Every delivery failed for {days:g} days without a single success, "
            "so the service disabled the webhook."
        )
        failing_before = now - disable_after_seconds
        clipped = _clip(reason, _REASON_MAX)
        if postgres:
            cursor.execute(_DISABLE_FAILING_POSTGRES, (clipped, now, candidates, failing_before))
        else:
            cursor.execute(
                _DISABLE_FAILING_SQLITE, (clipped, now, json.dumps(candidates), failing_before)
            )
        for (webhook_id,) in cursor.fetchall():
            effects.disabled[webhook_id] = reason


# -- the backlog ----------------------------------------------------------------------------


def backlog(session: Session, now: float) -> tuple[int, float | None]:
    """How many deliveries are pending, and since when the longest-waiting due one has been
    due (``None`` when none is due: leased rows come due only when their lease runs out)."""
    count, earliest = session.execute(
        text("SELECT count(*), min(next_attempt_at) FROM deliveries WHERE status = 'pending'")
    ).one()
    due = None if earliest is None or float(earliest) > now else float(earliest)
    return int(count), due


# -- retention ----------------------------------------------------------------------------


def delete_expired_attempts(session: Session, cutoff: float, limit: int) -> int:
    """Delete at most ``limit`` attempts made before ``cutoff``; return how many went.

    The attempts of a delivery still pending stay, however old: its log must show every
    attempt its count says it made until it is done, and its event goes with them later.
    """
    result = session.execute(
        text(
            "DELETE FROM attempts WHERE id IN ("
            " SELECT a.id FROM attempts a WHERE a.attempted_at < :cutoff AND NOT EXISTS ("
            "  SELECT 1 FROM deliveries d WHERE d.id = a.delivery_id AND d.status = 'pending')"
            " LIMIT :limit)"
        ),
        {"cutoff": cutoff, "limit": limit},
    )
    return rows_changed(result)


def delete_expired_events(session: Session, cutoff: float, limit: int) -> int:
    """Delete at most ``limit`` events created before ``cutoff``, with their deliveries.

    An event that still has a pending delivery is kept until that delivery is done: the
    outbox never drops work it has acknowledged.
    """
    result = session.execute(
        text(
            "DELETE FROM events WHERE id IN ("
            " SELECT e.id FROM events e WHERE e.created_at < :cutoff AND NOT EXISTS ("
            "  SELECT 1 FROM deliveries d WHERE d.event_id = e.id AND d.status = 'pending')"
            " LIMIT :limit)"
        ),
        {"cutoff": cutoff, "limit": limit},
    )
    return rows_changed(result)


# -- the per-webhook index, a second late on SQLite ------------------------------------------

#: The most rows one pass brings into the per-webhook index.
INDEX_BATCH = 20_000


def index_new_deliveries(session: Transaction, limit: int = INDEX_BATCH) -> int:
    """Bring up to ``limit`` deliveries not yet in the per-webhook index into it, oldest
    first; return how many.

    SQLite's publishing writes its rows outside ``ix_deliveries_webhook_created`` (migration
    0006): at once, each transaction would write one leaf page of it per webhook its events
    go to. A pass a second brings all of a second's rows in together, a page per webhook.
    PostgreSQL writes its rows indexed, and has none to bring in.
    """
    cursor = _cursor(session)
    try:
        cursor.execute(
            "UPDATE deliveries SET webhook_indexed = 1 WHERE id IN (SELECT id FROM deliveries "
            "WHERE webhook_indexed = 0 ORDER BY created_at LIMIT ?)",
            (limit,),
        )
        return int(cursor.rowcount)
    finally:
        cursor.close()


def webhook_rows(postgres: bool, condition: str = "", *, limited: bool = False) -> str:
    """A query of the ids of the deliveries of the webhook named by ``:webhook_id`` that
    meet ``condition`` (SQL over the table's columns; none for all), for ``IN (...)``;
    ``limited``, at most ``:limit`` of them.

    On SQLite it reads the webhook's rows in its index and, through the index of rows not
    yet in it, those of the last second: the per-webhook index is partial there, so a
    query by webhook alone would read the whole table.
    """
    mine = "webhook_id = :webhook_id" + (f" AND {condition}" if condition else "")
    if postgres:
        rows = f"SELECT id FROM deliveries WHERE {mine}"  # noqa: S608
    else:
        rows = (
            f"SELECT id FROM deliveries WHERE webhook_indexed = 1 AND {mine} UNION ALL "  # noqa: S608
            f"SELECT id FROM deliveries WHERE webhook_indexed = 0 AND {mine}"
        )
    return f"SELECT id FROM ({rows}) AS mine LIMIT :limit" if limited else rows  # noqa: S608


# -- the delivery log ---------------------------------------------------------------------


def list_deliveries(
    session: Session,
    webhook_id: str,
    *,
    status: DeliveryState | None,
    event_type: str | None,
    limit: int,
    after: Cursor | None,
) -> list[DeliveryRow]:
    """A page of a webhook's deliveries, newest first; one row more than ``limit`` tells of
    a next page.

    On SQLite the rows in the per-webhook index and those of the last second not yet in it
    are read apart, each through its index, and merged (see ``webhook_rows``).
    """
    query = select(DeliveryRow).where(col(DeliveryRow.webhook_id) == webhook_id)
    if status is not None:
        query = query.where(col(DeliveryRow.status) == status.value)
    if event_type:
        query = query.where(col(DeliveryRow.event_type) == event_type)
    if after is not None:
        query = query.where(
            tuple_(DeliveryRow.created_at, DeliveryRow.id) < tuple_(after.created_at, after.id)
        )
    query = query.order_by(
        DeliveryRow.created_at.desc(),  # type: ignore[attr-defined]
        DeliveryRow.id.desc(),  # type: ignore[attr-defined]
    ).limit(limit + 1)
    if is_postgres(session):
        return list(session.scalars(query))
    # The rows not yet indexed first: a row only ever goes into the index, so one that a
    # pass brings in between the two reads is read twice (and kept once), never missed.
    indexed = col(DeliveryRow.webhook_indexed)
    found = {
        row.id: row
        for flag in (False, True)
        for row in session.scalars(query.where(indexed == flag))
    }
    rows = sorted(found.values(), key=lambda row: (row.created_at, row.id), reverse=True)
    return rows[: limit + 1]


def latest_attempts(
    session: Session, delivery_ids: Sequence[str], per_delivery: int
) -> dict[str, list[AttemptRow]]:
    """The last ``per_delivery`` attempts of each delivery, oldest first, in one statement."""
    if not delivery_ids:
        return {}
    rank = (
        func.row_number()
        .over(
            partition_by=AttemptRow.delivery_id,
            order_by=(col(AttemptRow.number).desc(), col(AttemptRow.id).desc()),
        )
        .label("rank")
    )
    ranked = (
        select(AttemptRow, rank)
        .where(col(AttemptRow.delivery_id).in_(sorted(set(delivery_ids))))
        .subquery()
    )
    recent = select(AttemptRow).from_statement(
        select(ranked)
        .where(ranked.c.rank <= per_delivery)
        .order_by(ranked.c.delivery_id, ranked.c.number, ranked.c.id)
    )
    found: dict[str, list[AttemptRow]] = {}
    for attempt in session.scalars(recent):
        found.setdefault(attempt.delivery_id, []).append(attempt)
    return found


def get_delivery(
    session: Session, webhook_id: str, delivery_id: str
) -> tuple[DeliveryRow, list[AttemptRow]] | None:
    """A webhook's delivery with its attempts, oldest first; None when it is not the
    webhook's."""
    row = session.get(DeliveryRow, delivery_id)
    if row is None or row.webhook_id != webhook_id:
        return None
    attempts = session.scalars(
        select(AttemptRow)
        .where(col(AttemptRow.delivery_id) == delivery_id)
        .order_by(AttemptRow.number, AttemptRow.id)  # type: ignore[arg-type]
    )
    return row, list(attempts)


def _require_published(session: Session, webhook_id: str, action: str) -> None:
    webhook = session.get(WebhookRow, webhook_id)
    if webhook is not None and webhook.status != "published":
        raise FailedPrecondition(
            f"The webhook is {webhook.status}; set its status back to published before {action}.",
            reason="WEBHOOK_NOT_PUBLISHED",
            metadata={"status": webhook.status},
        )


def retry_delivery(
    session: Session, webhook_id: str, delivery_id: str, now: float
) -> tuple[DeliveryRow, list[AttemptRow], bool] | None:
    """Make a delivery due now, whatever its status; return it with its attempts so far and
    whether it was finished before (so queued once more), or None when it is not the
    webhook's.

    A delivery a dispatcher is sending right now is left to that attempt. Raises
    ``FailedPrecondition`` when the webhook is not published.
    """
    # Locked on PostgreSQL while deciding: a dispatcher leasing the row between this read
    # and the write below would otherwise lose its lease, and the delivery go out twice.
    row = session.get(DeliveryRow, delivery_id, with_for_update=True)
    if row is None or row.webhook_id != webhook_id:
        return None
    _require_published(session, webhook_id, "retrying its deliveries")
    in_flight = (
        row.status == DeliveryState.PENDING
        and row.lease_owner is not None
        and row.next_attempt_at is not None
        and row.next_attempt_at > now
    )
    requeued = row.status != DeliveryState.PENDING
    if not in_flight:
        row.status = DeliveryState.PENDING.value
        row.next_attempt_at = now
        row.lease_owner = None
        row.skip_reason = ""
        row.updated_at = now
        session.add(row)
        session.flush()
        announce_due(session)
    found = get_delivery(session, webhook_id, delivery_id)
    return None if found is None else (*found, requeued)


def requeue_failed_batch(
    session: Session,
    webhook_id: str,
    start: float,
    end: float,
    failed_before: float,
    now: float,
    limit: int,
) -> int:
    """Make up to ``limit`` failed deliveries of the window due now; return how many.

    Only deliveries that failed before ``failed_before`` (the recovery's start) qualify,
    so one that fails again meanwhile is not picked up a second time. Raises
    ``FailedPrecondition`` when the webhook is not published.
    """
    _require_published(session, webhook_id, "recovering its deliveries")
    # The outer test is not redundant: on PostgreSQL a row this statement had to wait for
    # is tested again as it stands once the lock is free, while the subquery's choice is
    # not. A recovery running beside another must skip the rows the other has queued (and a
    # dispatcher may already be sending), or it would send them a second time.
    chosen = webhook_rows(
        is_postgres(session),
        "status = 'failed' AND created_at >= :start AND created_at < :end "
        "AND updated_at <= :before",
        limited=True,
    )
    requeue = (
        "UPDATE deliveries SET status = 'pending', next_attempt_at = :now, "  # noqa: S608
        f"lease_owner = NULL, updated_at = :now WHERE id IN ({chosen}) "
        "AND status = 'failed' AND updated_at <= :before"
    )
    result = session.execute(
        text(requeue),
        {
            "webhook_id": webhook_id,
            "start": start,
            "end": end,
            "before": failed_before,
            "now": now,
            "limit": limit,
        },
    )
    count = rows_changed(result)
    if count:
        announce_due(session)
    return count


def deliveries_of_event(session: Session, event_id: str) -> list[DeliveryRow]:
    """Every delivery of an event (for inspection and tests)."""
    return list(
        session.scalars(
            select(DeliveryRow).where(DeliveryRow.event_id == event_id).order_by(DeliveryRow.id)  # type: ignore[arg-type]
        )
    )


def event_row(session: Session, event_id: str) -> EventRow | None:
    """The stored event, if any."""
    return session.get(EventRow, event_id)


def pending_count(session: Session) -> int:
    """How many deliveries are pending (due or leased or waiting for a retry)."""
    value = session.execute(
        select(func.count()).select_from(DeliveryRow).where(col(DeliveryRow.status) == "pending")
    ).scalar()
    return int(value or 0)
