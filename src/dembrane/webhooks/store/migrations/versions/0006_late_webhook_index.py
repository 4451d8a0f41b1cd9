"""Bring new deliveries into the per-webhook index a second late, on SQLite.

The index on ``(webhook_id, created_at)`` serves the delivery log, recoveries, a breaker's
hold-back and deletion. Written at once, it cost a publishing transaction one leaf page per
webhook its events went to: over a hundred webhooks, a hundred pages written and synced per
transaction, a third more CPU per event than over one webhook. On SQLite a new delivery is
now written with ``webhook_indexed`` false, outside the (now partial) index, and a pass once a
second brings every such row in together: one page per webhook per second. Queries by
webhook read the rows not yet indexed through an index of their own, by time.

SQLite cannot check a foreign key through a partial index, so the deliveries' key to their
webhook goes on SQLite (the table is rebuilt without it, with foreign keys off so that no
attempt cascades away with the old table); the service deletes a webhook's deliveries
itself, the last of them in the transaction that deletes the webhook. PostgreSQL keeps the
key and its full index, and writes every row indexed.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 17:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

#: Names for the constraints SQLite keeps unnamed, so that the rebuild can drop the key.
_NAMING = {"fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s"}
_WEBHOOK_KEY = "fk_deliveries_webhook_id_webhooks"


def upgrade() -> None:
    column = sa.Column("webhook_indexed", sa.Boolean(), nullable=False, server_default=sa.true())
    if op.get_bind().dialect.name != "sqlite":
        op.add_column("deliveries", column)
        op.create_index(
            "ix_deliveries_unindexed",
            "deliveries",
            ["created_at"],
            postgresql_where=sa.text("NOT webhook_indexed"),
        )
        return
    with op.batch_alter_table(
        "deliveries", recreate="always", naming_convention=_NAMING
    ) as batch_op:
        batch_op.add_column(column)
        batch_op.drop_constraint(_WEBHOOK_KEY, type_="foreignkey")
        batch_op.drop_index("ix_deliveries_webhook_created")
        batch_op.create_index(
            "ix_deliveries_webhook_created",
            ["webhook_id", "created_at"],
            sqlite_where=sa.text("webhook_indexed = 1"),
        )
        batch_op.create_index(
            "ix_deliveries_unindexed", ["created_at"], sqlite_where=sa.text("webhook_indexed = 0")
        )


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        op.drop_index("ix_deliveries_unindexed", table_name="deliveries")
        op.drop_column("deliveries", "webhook_indexed")
        return
    with op.batch_alter_table(
        "deliveries", recreate="always", naming_convention=_NAMING
    ) as batch_op:
        batch_op.drop_index("ix_deliveries_unindexed")
        batch_op.drop_index("ix_deliveries_webhook_created")
        batch_op.create_index("ix_deliveries_webhook_created", ["webhook_id", "created_at"])
        batch_op.create_foreign_key(
            _WEBHOOK_KEY, "webhooks", ["webhook_id"], ["id"], ondelete="CASCADE"
        )
        batch_op.drop_column("webhook_indexed")
