"""Preemption by priority: when a job was last asked to stop, and for which job.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Fair-share usage needs no table of its own: it is one `scheduler_state` row (`usage`).
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("preempt_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("preempted_by", sa.String(12), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("preempted_by")
        batch.drop_column("preempt_at")
