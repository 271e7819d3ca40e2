"""Gangs: how many nodes a multi-GPU job spans (1: one node, the default), and which nodes the
scheduler chose for the current attempt.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        # A column, not only the spec JSON: the scheduler reads candidates without parsing specs,
        # and a gang's fit (`gpus` split over `nodes` nodes) depends on it.
        batch.add_column(sa.Column("nodes", sa.Integer(), server_default="1", nullable=False))
        # Comma-separated Ray node ids: what an active gang holds on each of its nodes is
        # counted there before Ray's placement group reserves it.
        batch.add_column(sa.Column("gang_nodes", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("gang_nodes")
        batch.drop_column("nodes")
