"""Queries on webhooks: create, read, list, change, delete."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from sqlalchemy import delete, func, text, tuple_
from sqlmodel import Session, col, select
from sqlmodel.sql.expression import SelectOfScalar

from dembrane.webhooks.domain.errors import FailedPrecondition
from dembrane.webhooks.domain.paging import Cursor
from dembrane.webhooks.store import outbox
from dembrane.webhooks.store.database import Database, rows_changed
from dembrane.webhooks.store.tables import ProjectRow, WebhookRow


def events_of(row: WebhookRow) -> list[str]:
    """The event types a webhook row subscribes to."""
    events = json.loads(row.events)
    return [str(e) for e in events]


def encode_events(events: Sequence[str]) -> str:
    return json.dumps(list(events), separators=(",", ":"))


def add_webhook(session: Session, row: WebhookRow, limit: int | None = None) -> WebhookRow:
    """Store a new webhook; refused when its project already has ``limit`` of them."""
    if limit is not None and row.status != "archived":
        check_room(session, row.project_id, limit)
    session.add(row)
    session.flush()
    return row


def check_room(session: Session, project_id: str, limit: int) -> None:
    """Refuse one more webhook (archived ones aside) in a project that has ``limit``."""
    # Locks the project's row on PostgreSQL, so two creations cannot both see room for one.
    session.execute(select(ProjectRow.id).where(col(ProjectRow.id) == project_id).with_for_update())
    count = session.scalar(
        select(func.count())
        .select_from(WebhookRow)
        .where(col(WebhookRow.project_id) == project_id, col(WebhookRow.status) != "archived")
    )
    if (count or 0) >= limit:
        raise FailedPrecondition(
            f"This project already has {limit} webhooks, the most it may have; "
            "delete or archive one first.",
            reason="WEBHOOK_LIMIT_REACHED",
            metadata={"limit": str(limit)},
        )


def get_webhook(session: Session, project_id: str, webhook_id: str) -> WebhookRow | None:
    """The webhook, if it exists and belongs to the project."""
    row = session.get(WebhookRow, webhook_id)
    if row is None or row.project_id != project_id:
        return None
    return row


def list_webhooks(
    session: Session, project_id: str, limit: int, after: Cursor | None
) -> list[WebhookRow]:
    """A page of a project's webhooks, newest first (one extra row tells of a next page)."""
    query = select(WebhookRow).where(col(WebhookRow.project_id) == project_id)
    return _newest_first(session, query, limit, after)


def copyable_webhooks(
    session: Session, project_ids: Sequence[str], limit: int, after: Cursor | None
) -> list[WebhookRow]:
    """A page of the published webhooks of the given projects, newest first (one extra row
    tells of a next page)."""
    if not project_ids:
        return []
    query = select(WebhookRow).where(
        col(WebhookRow.project_id).in_(list(project_ids)),
        col(WebhookRow.status) == "published",
    )
    return _newest_first(session, query, limit, after)


def _newest_first(
    session: Session, query: SelectOfScalar[WebhookRow], limit: int, after: Cursor | None
) -> list[WebhookRow]:
    """``limit`` + 1 rows of ``query`` after ``after``, newest first."""
    if after is not None:
        query = query.where(
            tuple_(col(WebhookRow.created_at), col(WebhookRow.id))
            < tuple_(after.created_at, after.id)
        )
    query = query.order_by(col(WebhookRow.created_at).desc(), col(WebhookRow.id).desc()).limit(
        limit + 1
    )
    return list(session.scalars(query))


T = TypeVar("T")

#: Deliveries one transaction of a deletion removes, their attempts with them: milliseconds
#: of the store's time, so publishing and delivering go on between the batches.
DELETE_BATCH = 1000

# Deletions under way, kept referenced so that none is collected before it ends.
_DELETIONS: set[asyncio.Task[Any]] = set()


def delete_some_deliveries(session: Session, webhook_id: str, limit: int) -> int:
    """Delete at most ``limit`` of the webhook's deliveries (their attempts cascade)."""
    some = outbox.webhook_rows(outbox.is_postgres(session), limited=True)
    result = session.execute(
        text(f"DELETE FROM deliveries WHERE id IN ({some})"),  # noqa: S608
        {"webhook_id": webhook_id, "limit": limit},
    )
    return rows_changed(result)


def delete_all_deliveries(session: Session, webhook_ids: Sequence[str]) -> None:
    """Delete every delivery of the webhooks (their attempts cascade), in the transaction
    that deletes the webhooks: on SQLite no key makes them go with their webhook."""
    mine = outbox.webhook_rows(outbox.is_postgres(session))
    statement = text(f"DELETE FROM deliveries WHERE id IN ({mine})")  # noqa: S608
    for webhook_id in webhook_ids:
        session.execute(statement, {"webhook_id": webhook_id})


async def delete_gradually(
    database: Database,
    webhook_ids: Sequence[str],
    last: Callable[[Session], T],
    *,
    batch: int = DELETE_BATCH,
) -> T:
    """Delete the webhooks' deliveries a batch per transaction, then run ``last`` (which
    deletes the webhooks themselves, or their project) in one more.

    A webhook's history can be millions of rows; deleted in one statement, it held every
    other write of a SQLite store (publishing included) for seconds. The deletion goes on
    to its end even if the caller stops waiting, so that it never stops half done.
    """

    async def run() -> T:
        for webhook_id in webhook_ids:
            while await database.run_relaxed(delete_some_deliveries, webhook_id, batch) >= batch:
                pass
        return await database.run(last)

    task = asyncio.create_task(run(), name="webhooks-delete")
    _DELETIONS.add(task)
    task.add_done_callback(_deletion_done)
    return await asyncio.shield(task)


def _deletion_done(task: asyncio.Task[Any]) -> None:
    _DELETIONS.discard(task)
    # A caller still waiting gets the failure through the shield; a caller gone has its
    # answer already, and the rows left are deleted when the deletion is asked for again.
    if not task.cancelled():
        task.exception()


def delete_webhook(session: Session, webhook_id: str) -> bool:
    """Delete a webhook with its deliveries and their attempts. False when there was no
    such webhook (any more): another call deleted it first."""
    delete_all_deliveries(session, [webhook_id])
    result = session.execute(delete(WebhookRow).where(col(WebhookRow.id) == webhook_id))
    return rows_changed(result) > 0


def resume_pending(session: Session, webhook_id: str, now: float) -> int:
    """Make the webhook's waiting deliveries due at ``now``; return how many were waiting.

    For a change of the webhook's address or status: deliveries its breaker held back, or
    that wait for a retry, were scheduled after what the old receiver did. They now go to
    the new address at once (or, for a webhook no longer published, end at once as the
    change says) rather than after a cool-down of up to minutes. Rows leased to a
    dispatcher are in its hands and stay as they are.
    """
    result = session.execute(
        text(
            "UPDATE deliveries SET next_attempt_at = :now WHERE webhook_id = :webhook_id "
            "AND status = 'pending' AND lease_owner IS NULL AND next_attempt_at > :now"
        ),
        {"now": now, "webhook_id": webhook_id},
    )
    return rows_changed(result)
