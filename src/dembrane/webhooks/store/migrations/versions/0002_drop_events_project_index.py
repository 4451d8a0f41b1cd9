"""Drop the index on events.project_id: no query reads events by project.

Every published event paid for an insert into it, and with events spread over many projects
those inserts land all over the index: about a tenth of the store's work per event.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 22:58:00.000000
"""

from __future__ import annotations

from alembic import op


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_events_project_id'))


def downgrade() -> None:
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_events_project_id'), ['project_id'], unique=False)
