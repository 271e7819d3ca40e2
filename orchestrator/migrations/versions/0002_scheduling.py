"""Scheduling and fault recovery: per-kind retry budgets, backoff, placement, cost.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_INT_COLUMNS = ("infra_retries", "user_retries", "internal_retries")


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        # What the scheduler needs besides gpus / gpu_type / cpus (kept out of the spec JSON so
        # candidates are read without parsing it).
        batch.add_column(sa.Column("memory_gb", sa.Float(), nullable=True))
        batch.add_column(sa.Column("max_runtime_s", sa.Float(), nullable=True))
        # Exponential backoff: a requeued job is not dispatched before this time.
        batch.add_column(sa.Column("not_before", sa.DateTime(timezone=True), nullable=True))
        # Separate budgets per failure kind.
        for name in _INT_COLUMNS:
            batch.add_column(sa.Column(name, sa.Integer(), server_default="0", nullable=False))
        # Where the current attempt was placed (Ray node id) and that node's accelerator type.
        batch.add_column(sa.Column("node_id", sa.String(64), nullable=True))
        batch.add_column(sa.Column("accelerator", sa.String(64), nullable=True))
        # Money spent so far, all attempts together (None: no price configured).
        batch.add_column(sa.Column("cost_usd", sa.Float(), nullable=True))
    # Covers the scheduler's candidate query (queued jobs per priority/owner/shape class, oldest
    # first, minus those in backoff) so a round reads the index, not the rows with their specs.
    op.create_index("ix_jobs_scheduling_class", "jobs", list(SCHEDULING_CLASS))


# Frozen copy: a migration must not change when the code does.
SCHEDULING_CLASS = ("status", "priority", "owner", "gpus", "gpu_type", "cpus", "memory_gb",
                    "created_at", "id", "not_before")


def downgrade() -> None:
    op.drop_index("ix_jobs_scheduling_class", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        for name in ("cost_usd", "accelerator", "node_id", *_INT_COLUMNS, "not_before",
                     "max_runtime_s", "memory_gb"):
            batch.drop_column(name)
