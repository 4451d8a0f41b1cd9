"""The outbox: published events, their deliveries and attempts, and the queries on them.

Publishing writes an event and one delivery row per matching webhook in the caller's
transaction; the dispatcher then claims due rows, sends them, and records what came of them.
Every hot statement here is written for few round trips and batch sizes that stay bounded:

* claiming is one ``UPDATE`` driven by the partial index ``ix_deliveries_due`` (only pending
  rows, by due time; the literal ``status = 'pending'`` lets SQLite use that index), which
  leases the rows to one dispatcher by pushing ``next_attempt_at`` to the lease's end, then
  one ``SELECT`` that joins everything the sender needs;
* recording a batch of outcomes is one read of the rows still leased, then ``executemany``
  statements (attempt inserts, row updates) plus a few updates of the webhooks concerned;
* finishing and releasing only touch rows still leased to the caller, so a dispatcher whose
  lease ran out cannot overwrite another one's work.

On PostgreSQL the claim's subquery adds ``FOR UPDATE SKIP LOCKED`` so replicas never wait on
each other. No function loads more than one batch of rows into memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Table, bindparam, func, select, text, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, SQLModel, col

from dembrane.webhooks.domain.access import WEBHOOK_TIER, Tier, tier_allows_webhooks
from dembrane.webhooks.domain.errors import FailedPrecondition
from dembrane.webhooks.domain.ids import new_id
from dembrane.webhooks.domain.paging import Cursor
from dembrane.webhooks.domain.payload import EventData, ProjectInfo, render_body
from dembrane.webhooks.store.tables import AttemptRow, DeliveryRow, EventRow, WebhookRow

__all__ = [
    "ERROR_MAX",
    "AttemptRecord",
    "DeliveryClaim",
    "DeliveryResult",
    "DeliveryState",
    "PublishOutcome",
    "RecordEffects",
    "Release",
    "claim_due",
    "count_recoverable",
    "delete_expired_attempts",
    "delete_expired_events",
    "deliveries_of_event",
    "event_row",
    "get_delivery",
    "list_deliveries",
    "next_due_time",
    "pending_count",
    "publish_events",
    "record_results",
    "release_stale_leases",
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


def _is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


#: The PostgreSQL channel on which new due work is announced to every replica's dispatcher.
DUE_CHANNEL = "webhooks_due"


def announce_due(session: Session) -> None:
    """Tell the dispatchers of every replica that work came due (PostgreSQL only).

    The notification is sent when the transaction commits, never before, and PostgreSQL
    folds repeats within one transaction into one. On SQLite a single process owns the
    database and wakes its own dispatcher.
    """
    if _is_postgres(session):
        session.execute(text("SELECT pg_notify(:channel, '')"), {"channel": DUE_CHANNEL})


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


def publish_events(
    session: Session, events: Sequence[EventData], *, now: float, dashboard_base_url: str
) -> list[PublishOutcome]:
    """Store ``events`` and their deliveries; return one outcome per event, in order.

    An id that is already stored, or that appears earlier in ``events``, is a duplicate:
    nothing is written for it and its outcome repeats the first publication's. Raises
    ``FailedPrecondition`` when a new event's project is unknown, so that nothing of the
    batch is stored.
    """
    ids = list(dict.fromkeys(event.id for event in events))
    known = _stored_outcomes(session, ids)

    fresh: dict[str, EventData] = {}
    for event in events:
        if event.id not in known and event.id not in fresh:
            fresh[event.id] = event

    first: dict[str, PublishOutcome] = {}
    if fresh:
        first = _insert_fresh(session, list(fresh.values()), now, dashboard_base_url)
        if any(outcome.delivery_count for outcome in first.values()):
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


def _stored_outcomes(session: Session, ids: Sequence[str]) -> dict[str, PublishOutcome]:
    if not ids:
        return {}
    rows = session.execute(
        text("SELECT id, delivery_count, skip_reason FROM events WHERE id IN :ids").bindparams(
            bindparam("ids", expanding=True)
        ),
        {"ids": list(ids)},
    ).all()
    return {
        row.id: PublishOutcome(row.id, True, int(row.delivery_count), row.skip_reason)
        for row in rows
    }


@dataclass(frozen=True, slots=True)
class _ProjectFacts:
    info: ProjectInfo
    tier: Tier


def _project_facts(session: Session, project_ids: Iterable[str]) -> dict[str, _ProjectFacts]:
    rows = session.execute(
        text(
            "SELECT p.id, p.name, p.language, w.tier FROM projects p "
            "JOIN workspaces w ON w.id = p.workspace_id WHERE p.id IN :ids"
        ).bindparams(bindparam("ids", expanding=True)),
        {"ids": sorted(set(project_ids))},
    ).all()
    return {
        row.id: _ProjectFacts(ProjectInfo(row.id, row.name, row.language), Tier(row.tier))
        for row in rows
    }


def _subscribers(
    session: Session, project_ids: Iterable[str]
) -> dict[str, list[tuple[str, frozenset[str]]]]:
    """Published webhooks by project: (webhook id, subscribed types), oldest first."""
    rows = session.execute(
        text(
            "SELECT id, project_id, events FROM webhooks "
            "WHERE project_id IN :ids AND status = 'published' ORDER BY created_at, id"
        ).bindparams(bindparam("ids", expanding=True)),
        {"ids": sorted(set(project_ids))},
    ).all()
    hooks: dict[str, list[tuple[str, frozenset[str]]]] = {}
    for row in rows:
        types = frozenset(str(t) for t in json.loads(row.events))
        hooks.setdefault(row.project_id, []).append((row.id, types))
    return hooks


def _insert_fresh(
    session: Session, events: Sequence[EventData], now: float, dashboard_base_url: str
) -> dict[str, PublishOutcome]:
    facts = _project_facts(session, (e.project_id for e in events))
    unknown = sorted({e.project_id for e in events if e.project_id not in facts})
    if unknown:
        names = ", ".join(repr(p) for p in unknown)
        raise FailedPrecondition(
            f"Project {names} is unknown to the directory; "
            "upsert it through DirectoryService before publishing its events.",
            reason="PROJECT_UNKNOWN",
            metadata={"project_id": unknown[0]},
        )
    hooks = _subscribers(session, facts)

    event_rows: list[dict[str, Any]] = []
    deliveries: dict[str, list[dict[str, Any]]] = {}
    outcomes: dict[str, PublishOutcome] = {}
    for event in events:
        project = facts[event.project_id]
        body = render_body(event, project.info, dashboard_base_url)
        skip_reason = "" if tier_allows_webhooks(project.tier) else tier_skip_reason(project.tier)
        status = DeliveryState.SKIPPED if skip_reason else DeliveryState.PENDING
        rows = [
            {
                "id": new_id("dlv"),
                "event_id": event.id,
                "webhook_id": webhook_id,
                "event_type": event.type,
                "status": status.value,
                "attempt_count": 0,
                "next_attempt_at": None if skip_reason else now,
                "lease_owner": None,
                "created_at": now,
                "updated_at": now,
                "last_attempt_at": None,
                "last_status_code": None,
                "last_error": "",
                "skip_reason": skip_reason,
            }
            for webhook_id, types in hooks.get(event.project_id, ())
            if event.type in types
        ]
        queued = 0 if skip_reason else len(rows)
        deliveries[event.id] = rows
        outcomes[event.id] = PublishOutcome(event.id, False, queued, skip_reason)
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

    inserted = _insert_events_once(session, event_rows)
    if len(inserted) < len(event_rows):
        # Another transaction stored some of these ids between our read and our insert
        # (possible on PostgreSQL only): theirs is the first publication.
        raced = [row["id"] for row in event_rows if row["id"] not in inserted]
        outcomes.update(_stored_outcomes(session, raced))
    delivery_rows = [row for event_id in inserted for row in deliveries[event_id]]
    if delivery_rows:
        session.execute(_table("deliveries").insert(), delivery_rows)
    return outcomes


def _insert_events_once(session: Session, rows: list[dict[str, Any]]) -> set[str]:
    """Insert event rows, ignoring ids that exist; return the ids actually inserted."""
    events = _table("events")
    dialect = postgresql if _is_postgres(session) else sqlite
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


@dataclass(frozen=True, slots=True)
class DeliveryClaim:
    """A delivery leased to one dispatcher, with everything needed to send it."""

    delivery_id: str
    event_id: str
    event_type: str
    webhook_id: str
    attempt_count: int
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
        expires = self.previous_secret_expires_at
        if self.previous_secret and expires is not None and expires > now:
            return (self.secret, self.previous_secret)
        return (self.secret,)


_CLAIM = """
UPDATE deliveries SET next_attempt_at = :lease_until, lease_owner = :owner
WHERE id IN (
    SELECT id FROM deliveries
    WHERE status = 'pending' AND next_attempt_at <= :now
    ORDER BY next_attempt_at
    LIMIT :limit{lock}
)
RETURNING id
"""

_CLAIMED = text(
    """
SELECT d.id, d.event_id, d.event_type, d.webhook_id, d.attempt_count, e.body,
       w.url, w.status, w.updated_at AS webhook_updated_at, w.disabled_reason,
       w.secret, w.previous_secret, w.previous_secret_expires_at, ws.tier
FROM deliveries d
JOIN events e ON e.id = d.event_id
JOIN webhooks w ON w.id = d.webhook_id
JOIN projects p ON p.id = w.project_id
JOIN workspaces ws ON ws.id = p.workspace_id
WHERE d.id IN :ids
"""
).bindparams(bindparam("ids", expanding=True))


def claim_due(
    session: Session, owner: str, now: float, lease_seconds: float, limit: int
) -> list[DeliveryClaim]:
    """Lease up to ``limit`` due deliveries to ``owner``, oldest due first, and return them.

    A leased row stays pending with ``next_attempt_at`` at the lease's end: if its owner
    never finishes it (a crash), it simply comes due again then.
    """
    if limit <= 0:
        return []
    lock = " FOR UPDATE SKIP LOCKED" if _is_postgres(session) else ""
    ids = list(
        session.execute(
            text(_CLAIM.format(lock=lock)),
            {"lease_until": now + lease_seconds, "owner": owner, "now": now, "limit": limit},
        ).scalars()
    )
    if not ids:
        return []
    rows = session.execute(_CLAIMED, {"ids": ids}).all()
    claims = [
        DeliveryClaim(
            delivery_id=row.id,
            event_id=row.event_id,
            event_type=row.event_type,
            webhook_id=row.webhook_id,
            attempt_count=int(row.attempt_count),
            body=bytes(row.body),
            url=row.url,
            webhook_status=row.status,
            webhook_updated_at=float(row.webhook_updated_at),
            disabled_reason=row.disabled_reason,
            secret=row.secret,
            previous_secret=row.previous_secret,
            previous_secret_expires_at=row.previous_secret_expires_at,
            tier=Tier(row.tier),
        )
        for row in rows
    ]
    # Keep the claim's order (oldest due first); the join returns rows in any order.
    position = {delivery_id: index for index, delivery_id in enumerate(ids)}
    claims.sort(key=lambda claim: position[claim.delivery_id])
    return claims


def next_due_time(session: Session) -> float | None:
    """When the earliest pending delivery is due (leased ones at their lease's end)."""
    value = session.execute(
        text("SELECT MIN(next_attempt_at) FROM deliveries WHERE status = 'pending'")
    ).scalar()
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


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One HTTP request made for a delivery, as the log keeps it."""

    number: int
    attempted_at: float
    status_code: int | None
    latency_ms: float
    response_body: str
    error: str
    success: bool


@dataclass(frozen=True, slots=True)
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
    #: Results and releases whose row was no longer leased to the caller, so were dropped.
    stale: int = 0


_OWNED = """
SELECT id FROM deliveries WHERE id IN :ids AND lease_owner = :owner{lock}
"""

_FINISH_ATTEMPTED = text(
    """
UPDATE deliveries SET status = :status, attempt_count = :attempt_count,
    next_attempt_at = :next_attempt_at, lease_owner = NULL, updated_at = :now,
    last_attempt_at = :last_attempt_at, last_status_code = :last_status_code,
    last_error = :last_error
WHERE id = :id AND lease_owner = :owner
"""
)

_FINISH_UNSENT = text(
    """
UPDATE deliveries SET status = :status, next_attempt_at = :next_attempt_at,
    lease_owner = NULL, updated_at = :now, last_error = :last_error, skip_reason = :skip_reason
WHERE id = :id AND lease_owner = :owner
"""
)

_RELEASE = text(
    """
UPDATE deliveries SET next_attempt_at = :next_attempt_at, lease_owner = NULL
WHERE id = :id AND lease_owner = :owner
"""
)


def record_results(
    session: Session,
    owner: str,
    results: Sequence[DeliveryResult],
    releases: Sequence[Release],
    now: float,
    disable_after_seconds: float,
) -> RecordEffects:
    """Record a batch of outcomes and releases of deliveries leased to ``owner``.

    Rows no longer leased to ``owner`` are left alone (their lease ran out and someone else
    has them). Webhooks keep the start of their current run of failures; one failing for
    ``disable_after_seconds`` without a success, or answering 410, is disabled.
    """
    effects = RecordEffects()
    ids = [r.delivery_id for r in results] + [r.delivery_id for r in releases]
    if not ids:
        return effects
    # One read finds the rows still ours; on PostgreSQL it also locks them, so no other
    # dispatcher can lease them between this check and the writes below.
    lock = " FOR UPDATE" if _is_postgres(session) else ""
    owned = set(
        session.execute(
            text(_OWNED.format(lock=lock)).bindparams(bindparam("ids", expanding=True)),
            {"ids": ids, "owner": owner},
        ).scalars()
    )
    results = [r for r in results if r.delivery_id in owned]
    releases = [r for r in releases if r.delivery_id in owned]
    effects.stale = len(ids) - len(results) - len(releases)

    attempted = [r for r in results if r.attempts]
    unsent = [r for r in results if not r.attempts]
    attempt_rows = [
        {
            "delivery_id": result.delivery_id,
            "number": attempt.number,
            "attempted_at": attempt.attempted_at,
            "status_code": attempt.status_code,
            "latency_ms": attempt.latency_ms,
            "response_body": attempt.response_body,
            "error": _clip(attempt.error, ERROR_MAX),
            "success": attempt.success,
        }
        for result in attempted
        for attempt in result.attempts
    ]
    if attempt_rows:
        session.execute(_table("attempts").insert(), attempt_rows)
    if attempted:
        session.execute(
            _FINISH_ATTEMPTED,
            [
                {
                    "id": r.delivery_id,
                    "owner": owner,
                    "status": r.status.value,
                    "attempt_count": r.attempt_count,
                    "next_attempt_at": r.next_attempt_at,
                    "now": now,
                    "last_attempt_at": r.attempts[-1].attempted_at,
                    "last_status_code": r.attempts[-1].status_code,
                    "last_error": _clip(r.last_error, ERROR_MAX),
                }
                for r in attempted
            ],
        )
    if unsent:
        session.execute(
            _FINISH_UNSENT,
            [
                {
                    "id": r.delivery_id,
                    "owner": owner,
                    "status": r.status.value,
                    "next_attempt_at": r.next_attempt_at,
                    "now": now,
                    "last_error": _clip(r.last_error, ERROR_MAX),
                    "skip_reason": _clip(r.skip_reason, _REASON_MAX),
                }
                for r in unsent
            ],
        )
    if releases:
        session.execute(
            _RELEASE,
            [
                {"id": r.delivery_id, "owner": owner, "next_attempt_at": r.next_attempt_at}
                for r in releases
            ],
        )
    _track_failures(session, attempted, now, disable_after_seconds, effects)
    return effects


def _rowcount(result: Any) -> int:
    count = getattr(result, "rowcount", -1)
    return int(count) if count is not None and count >= 0 else 0


def _track_failures(
    session: Session,
    attempted: Sequence[DeliveryResult],
    now: float,
    disable_after_seconds: float,
    effects: RecordEffects,
) -> None:
    """Keep each webhook's ``failing_since`` and disable the ones that must stop."""
    last_success: dict[str, float] = {}
    for result in attempted:
        for attempt in result.attempts:
            if attempt.success:
                seen = last_success.get(result.webhook_id)
                if seen is None or attempt.attempted_at > seen:
                    last_success[result.webhook_id] = attempt.attempted_at
    # The first failure after the webhook's last success in this batch (or at all).
    first_failure: dict[str, float] = {}
    for result in attempted:
        after = last_success.get(result.webhook_id)
        for attempt in result.attempts:
            if attempt.success or (after is not None and attempt.attempted_at <= after):
                continue
            seen = first_failure.get(result.webhook_id)
            if seen is None or attempt.attempted_at < seen:
                first_failure[result.webhook_id] = attempt.attempted_at

    webhooks = _table("webhooks")
    recovered = [{"wid": wid, "since": first_failure.get(wid)} for wid in sorted(last_success)]
    if recovered:
        session.execute(
            update(webhooks)
            .where(webhooks.c.id == bindparam("wid"))
            .values(failing_since=bindparam("since")),
            recovered,
        )
    failing = [
        {"wid": wid, "since": since}
        for wid, since in sorted(first_failure.items())
        if wid not in last_success
    ]
    if failing:
        session.execute(
            update(webhooks)
            .where(webhooks.c.id == bindparam("wid"), webhooks.c.failing_since.is_(None))
            .values(failing_since=bindparam("since")),
            failing,
        )

    gone = {r.webhook_id: r.disable_reason for r in attempted if r.disable_reason}
    for webhook_id, reason in sorted(gone.items()):
        if reason and _disable(session, webhook_id, reason, now, None):
            effects.disabled[webhook_id] = reason
    if first_failure and disable_after_seconds > 0:
        days = disable_after_seconds / 86400
        reason = (
            f"Every delivery failed for {days:g} days without a single success, "
            "so the service disabled the webhook."
        )
        for webhook_id in sorted(first_failure):
            if webhook_id in effects.disabled:
                continue
            if _disable(session, webhook_id, reason, now, now - disable_after_seconds):
                effects.disabled[webhook_id] = reason


def _disable(
    session: Session, webhook_id: str, reason: str, now: float, failing_before: float | None
) -> bool:
    webhooks = _table("webhooks")
    statement = (
        update(webhooks)
        .where(webhooks.c.id == webhook_id, webhooks.c.status == "published")
        .values(status="disabled", disabled_reason=_clip(reason, _REASON_MAX), updated_at=now)
    )
    if failing_before is not None:
        statement = statement.where(
            webhooks.c.failing_since.is_not(None), webhooks.c.failing_since <= failing_before
        )
    return _rowcount(session.execute(statement)) > 0


# -- retention ----------------------------------------------------------------------------


def delete_expired_attempts(session: Session, cutoff: float, limit: int) -> int:
    """Delete at most ``limit`` attempts made before ``cutoff``; return how many went."""
    result = session.execute(
        text(
            "DELETE FROM attempts WHERE id IN "
            "(SELECT id FROM attempts WHERE attempted_at < :cutoff LIMIT :limit)"
        ),
        {"cutoff": cutoff, "limit": limit},
    )
    return _rowcount(result)


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
    return _rowcount(result)


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
    a next page."""
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
    return list(session.scalars(query))


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
) -> DeliveryRow | None:
    """Make a delivery due now, whatever its status; None when it is not the webhook's.

    A delivery a dispatcher is sending right now is left to that attempt. Raises
    ``FailedPrecondition`` when the webhook is not published.
    """
    row = session.get(DeliveryRow, delivery_id)
    if row is None or row.webhook_id != webhook_id:
        return None
    _require_published(session, webhook_id, "retrying its deliveries")
    in_flight = (
        row.status == DeliveryState.PENDING
        and row.lease_owner is not None
        and row.next_attempt_at is not None
        and row.next_attempt_at > now
    )
    if not in_flight:
        row.status = DeliveryState.PENDING.value
        row.next_attempt_at = now
        row.lease_owner = None
        row.skip_reason = ""
        row.updated_at = now
        session.add(row)
        announce_due(session)
    return row


def count_recoverable(
    session: Session, webhook_id: str, start: float, end: float, failed_before: float
) -> int:
    """How many of a webhook's deliveries created in [start, end) failed before
    ``failed_before``. Raises ``FailedPrecondition`` when the webhook is not published."""
    _require_published(session, webhook_id, "recovering its deliveries")
    value = session.execute(
        text(
            "SELECT COUNT(*) FROM deliveries WHERE webhook_id = :wid AND status = 'failed' "
            "AND created_at >= :start AND created_at < :end AND updated_at <= :before"
        ),
        {"wid": webhook_id, "start": start, "end": end, "before": failed_before},
    ).scalar()
    return int(value or 0)


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
    so one that fails again meanwhile is not picked up a second time.
    """
    result = session.execute(
        text(
            "UPDATE deliveries SET status = 'pending', next_attempt_at = :now, "
            "lease_owner = NULL, updated_at = :now "
            "WHERE id IN (SELECT id FROM deliveries WHERE webhook_id = :wid "
            "AND status = 'failed' AND created_at >= :start AND created_at < :end "
            "AND updated_at <= :before LIMIT :limit)"
        ),
        {
            "wid": webhook_id,
            "start": start,
            "end": end,
            "before": failed_before,
            "now": now,
            "limit": limit,
        },
    )
    count = _rowcount(result)
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
