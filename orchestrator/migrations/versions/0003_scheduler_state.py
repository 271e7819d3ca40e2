"""What the controllers publish for the CLI: why queued jobs wait.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # One row per name, replaced as a whole: the last scheduling round's summary (`waiting`) is
    # a few hundred bytes, keyed by job class, so writing it costs one row whatever the queue.
    op.create_table(
        "scheduler_state",
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("data", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_scheduler_state"),
    )


def downgrade() -> None:
    op.drop_table("scheduler_state")
