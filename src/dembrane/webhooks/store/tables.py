"""The tables, as SQLModel classes.

Times are stored as Unix seconds (floats): the dispatcher compares and indexes them on its
hot path, and they mean the same on SQLite and PostgreSQL, with no time-zone surprises.
The schema itself is created and changed only by the alembic migrations in ``migrations/``.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, ForeignKey, Index, LargeBinary, String, Text, text, true
from sqlmodel import Field, SQLModel


class WorkspaceRow(SQLModel, table=True):
    """A workspace of the platform and its tier (a ``Tier`` value)."""

    __tablename__ = "workspaces"

    id: str = Field(primary_key=True, max_length=128)
    name: str = Field(default="", max_length=200)
    tier: int
    created_at: float
    updated_at: float


class ProjectRow(SQLModel, table=True):
    """A project of a workspace; its name and language appear in delivered bodies."""

    __tablename__ = "projects"

    id: str = Field(primary_key=True, max_length=128)
    workspace_id: str = Field(
        sa_column=Column(
            String(128),
            ForeignKey("workspaces.id", ondelete="CASCADE"),
            nullable=False,
            index=True,
        )
    )
    name: str = Field(default="", max_length=200)
    language: str = Field(default="", max_length=16)
    created_at: float
    updated_at: float


class MembershipRow(SQLModel, table=True):
    """A user's role in a workspace."""

    __tablename__ = "memberships"

    workspace_id: str = Field(
        sa_column=Column(
            String(128), ForeignKey("workspaces.id", ondelete="CASCADE"), primary_key=True
        )
    )
    user_id: str = Field(primary_key=True, max_length=128, index=True)
    role: str = Field(max_length=16)
    updated_at: float


class WebhookRow(SQLModel, table=True):
    """A registered webhook with its secret and the state the dispatcher keeps on it."""

    __tablename__ = "webhooks"
    __table_args__ = (Index("ix_webhooks_project_created", "project_id", "created_at"),)

    id: str = Field(primary_key=True, max_length=40)
    project_id: str = Field(
        sa_column=Column(String(128), ForeignKey("projects.id", ondelete="CASCADE"), nullable=False)
    )
    name: str = Field(max_length=200)
    url: str = Field(max_length=2048)
    # The subscribed event types, as a JSON array.
    events: str = Field(sa_column=Column(Text, nullable=False))
    status: str = Field(max_length=16)
    secret: str = Field(max_length=256)
    previous_secret: str | None = Field(default=None, max_length=256)
    previous_secret_expires_at: float | None = None
    disabled_reason: str = Field(default="", max_length=500)
    created_at: float
    updated_at: float
    # When the current run of failures began; cleared by any success.
    failing_since: float | None = None


class EventRow(SQLModel, table=True):
    """A published event with its body, rendered once so every retry sends the same bytes."""

    __tablename__ = "events"

    id: str = Field(primary_key=True, max_length=128)
    type: str = Field(max_length=64)
    # Kept with the event, but not indexed: no query reads events by project.
    project_id: str = Field(max_length=128)
    occurred_at: float
    created_at: float = Field(index=True)
    body: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    skip_reason: str = Field(default="", max_length=500)
    delivery_count: int = 0


class DeliveryRow(SQLModel, table=True):
    """One event to one webhook: the outbox row the dispatcher claims and updates."""

    __tablename__ = "deliveries"
    __table_args__ = (
        # The claim query's index: only pending rows, by due time. The webhook is in it so
        # that claims leave out the rows of webhooks they skip without reading those rows.
        Index(
            "ix_deliveries_due",
            "next_attempt_at",
            "webhook_id",
            sqlite_where=text("status = 'pending'"),
            postgresql_where=text("status = 'pending'"),
        ),
        # A webhook's rows by time. On SQLite a new row enters it a second late (see
        # ``webhook_indexed``); until then ``ix_deliveries_unindexed`` finds it.
        Index(
            "ix_deliveries_webhook_created",
            "webhook_id",
            "created_at",
            sqlite_where=text("webhook_indexed = 1"),
        ),
        Index(
            "ix_deliveries_unindexed",
            "created_at",
            sqlite_where=text("webhook_indexed = 0"),
            postgresql_where=text("NOT webhook_indexed"),
        ),
    )

    id: str = Field(primary_key=True, max_length=40)
    event_id: str = Field(
        sa_column=Column(
            String(128),
            ForeignKey("events.id", ondelete="CASCADE"),
            nullable=False,
            index=True,
        )
    )
    # The key holds on PostgreSQL. SQLite's schema has none since migration 0006 (it could
    # not be checked through the partial index): the service deletes a webhook's rows.
    webhook_id: str = Field(
        sa_column=Column(String(40), ForeignKey("webhooks.id", ondelete="CASCADE"), nullable=False)
    )
    event_type: str = Field(max_length=64)
    status: str = Field(max_length=16)
    # Slots of the retry schedule used; attempts the service lost itself take none at first.
    attempt_count: int = 0
    # Attempts lost with a sender process, so their numbers and allowance outlive a restart.
    lost_attempts: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    next_attempt_at: float | None = None
    # Which dispatcher holds the lease, so a late finisher cannot overwrite another's claim.
    lease_owner: str | None = Field(default=None, max_length=64)
    created_at: float
    updated_at: float
    last_attempt_at: float | None = None
    last_status_code: int | None = None
    last_error: str = Field(default="", max_length=1000)
    skip_reason: str = Field(default="", max_length=500)
    # Whether the row is in ``ix_deliveries_webhook_created`` yet. SQLite's publishing
    # writes it false and a pass once a second sets it (migration 0006): the index then
    # takes a page per webhook per second, not one per webhook per publishing transaction.
    webhook_indexed: bool = Field(default=True, sa_column_kwargs={"server_default": true()})


class AttemptRow(SQLModel, table=True):
    """One HTTP request made for a delivery."""

    __tablename__ = "attempts"

    id: int | None = Field(default=None, primary_key=True)
    delivery_id: str = Field(
        sa_column=Column(
            String(40),
            ForeignKey("deliveries.id", ondelete="CASCADE"),
            nullable=False,
            index=True,
        )
    )
    number: int
    attempted_at: float = Field(index=True)
    status_code: int | None = None
    latency_ms: float
    response_body: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    error: str = Field(default="", max_length=1000)
    success: bool = False


class DirectoryVersionRow(SQLModel, table=True):
    """One row whose stamp is drawn anew at every change to what publishing and claiming
    read of the directory (a project's name, language or workspace, a workspace's tier, any
    of a webhook's sending facts). Triggers keep it on SQLite (migration 0005), so a change
    made by any writer counts; a connection may keep those facts in memory while the stamp
    stays. PostgreSQL's transactions read the facts each time, and its row stays as made."""

    __tablename__ = "directory_version"

    id: int = Field(primary_key=True)
    version: int = Field(sa_column=Column(BigInteger, nullable=False))
