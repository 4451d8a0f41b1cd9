"""Count each delivery's lost attempts in its row.

An attempt the service lost (its sender process stopped mid-request) takes no slot of the
retry schedule, up to a few per delivery. The count used to live in the dispatcher's memory,
so after a restart, or on another replica, the next attempt took a lost one's number in the
log and the allowance started again. In the row it survives both.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 08:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("lost_attempts", sa.Integer(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_column("lost_attempts")
