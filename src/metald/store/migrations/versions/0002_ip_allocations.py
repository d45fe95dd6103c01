"""The ip_allocations table: which VM holds which address (unique per address).

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


def upgrade() -> None:
    op.create_table(
        "ip_allocations",
        sa.Column("address", sa.String(64), primary_key=True),
        sa.Column("vm_id", sa.String(64), nullable=False),
        sa.Column("family", sa.Integer, nullable=False),
        sa.Column("allocated_at", sa.Float, nullable=False),
    )
    op.create_index("ix_ip_allocations_vm", "ip_allocations", ["vm_id"])
    op.create_index("ix_ip_allocations_family", "ip_allocations", ["family"])


def downgrade() -> None:
    op.drop_table("ip_allocations")
