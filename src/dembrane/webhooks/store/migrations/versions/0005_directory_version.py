"""Stamp the directory's versions, so its facts can be kept in memory between reads.

Every publishing transaction read the facts of its events' projects (name, language, tier,
webhooks), and every claim those of its webhooks. Over many projects that read is most of a
small transaction's work: about 1 ms for 100 projects on SQLite, while one project costs
0.04 ms. A single row now holds a stamp of those facts. Triggers draw a new one at random on
any insert, delete or change of the columns read, whoever writes (the service, a migration,
a person at a SQL prompt), and a transaction that reads the stamp it read before may use
what it read then. A random stamp, unlike a counter, is never taken again after a rolled
back change: a number counted up and rolled back would come round again for other facts.
The triggers are made on SQLite only, where the facts are kept (see ``upgrade``).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 10:20:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

#: Per table, the columns whose change alters what publishing or claiming reads.
_WATCHED = {
    "workspaces": ("tier",),
    "projects": ("workspace_id", "name", "language"),
    "webhooks": (
        "project_id",
        "url",
        "events",
        "status",
        "secret",
        "previous_secret",
        "previous_secret_expires_at",
        "disabled_reason",
        "created_at",
        "updated_at",
    ),
}
#: A new stamp: any 64-bit number.
_BUMP = "UPDATE directory_version SET version = random() WHERE id = 1"


def _triggers() -> list[tuple[str, str, str]]:
    """(trigger name, table, timing clause) of every trigger the migration makes."""
    made = []
    for table, columns in _WATCHED.items():
        made.append((f"{table}_directory_insert", table, "AFTER INSERT"))
        made.append((f"{table}_directory_delete", table, "AFTER DELETE"))
        made.append((f"{table}_directory_update", table, f"AFTER UPDATE OF {', '.join(columns)}"))
    return made


def upgrade() -> None:
    op.create_table(
        "directory_version",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.execute("INSERT INTO directory_version (id, version) VALUES (1, 0)")
    if op.get_bind().dialect.name == "postgresql":
        # PostgreSQL's transactions read the facts each time. Kept by triggers there, the
        # row would make every change to the directory wait for the others to commit.
        return
    for name, table, timing in _triggers():
        op.execute(f"CREATE TRIGGER {name} {timing} ON {table} BEGIN {_BUMP}; END")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        for name, _table, _timing in _triggers():
            op.execute(f"DROP TRIGGER {name}")
    op.drop_table("directory_version")
