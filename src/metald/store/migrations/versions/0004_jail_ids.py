"""The jail_ids table: which VM's VMM runs as which uid/gid on which node.

Revision ID: 0004_jail_ids
Revises: 0003_quotas
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_jail_ids"
down_revision = "0003_quotas"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "jail_ids",
        sa.Column("node", sa.String(128), primary_key=True),
        sa.Column("uid", sa.Integer, primary_key=True),
        sa.Column("vm_id", sa.String(64), nullable=False),
        sa.Column("claimed_at", sa.Float, nullable=False),
        sa.UniqueConstraint("node", "vm_id", name="uq_jail_ids_vm"),
    )


def downgrade() -> None:
    op.drop_table("jail_ids")
