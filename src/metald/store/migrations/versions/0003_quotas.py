"""Quotas: per-customer overrides, the admission ledger (one claim per VM) and the lock rows
admissions take. VMs that exist already get their claim from their config, so they count
(their disks as 0 bytes: the sizes were not recorded when they were made).

Revision ID: 0003_quotas
Revises: 0002
"""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0003_quotas"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "quota_overrides",
        sa.Column("customer_id", sa.String(128), primary_key=True),
        sa.Column("resource", sa.String(32), primary_key=True),
        sa.Column("value", sa.BigInteger, nullable=True),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    claims = op.create_table(
        "vm_claims",
        sa.Column("vm_id", sa.String(64), primary_key=True),
        sa.Column("customer_id", sa.String(128), nullable=False),
        sa.Column("node", sa.String(128), nullable=False),
        sa.Column("vcpus", sa.Integer, nullable=False),
        sa.Column("memory_bytes", sa.BigInteger, nullable=False),
        sa.Column("disk_bytes", sa.BigInteger, nullable=False),
        sa.Column("held", sa.Boolean, nullable=False),
        sa.Column("claimed_at", sa.Float, nullable=False),
    )
    op.create_index("ix_vm_claims_customer", "vm_claims", ["customer_id"])
    op.create_index("ix_vm_claims_node", "vm_claims", ["node"])
    op.create_table(
        "admission_locks",
        sa.Column("scope", sa.String(160), primary_key=True),
        sa.Column("turns", sa.BigInteger, nullable=False),
    )
    vms = sa.table(
        "vms",
        sa.column("id", sa.String),
        sa.column("customer_id", sa.String),
        sa.column("node", sa.String),
        sa.column("config", sa.JSON),
        sa.column("deleted_at", sa.Float),
    )
    rows = op.get_bind().execute(
        sa.select(vms.c.id, vms.c.customer_id, vms.c.node, vms.c.config).where(
            vms.c.deleted_at.is_(None)
        )
    )
    now = time.time()
    existing: list[dict[str, Any]] = [
        {
            "vm_id": row.id,
            "customer_id": row.customer_id,
            "node": row.node,
            "vcpus": int((row.config or {}).get("vcpu_count", 1)),
            "memory_bytes": int((row.config or {}).get("memory_bytes", 0)),
            "disk_bytes": 0,
            "held": False,
            "claimed_at": now,
        }
        for row in rows
    ]
    if existing:
        op.bulk_insert(claims, existing)


def downgrade() -> None:
    op.drop_table("admission_locks")
    op.drop_table("vm_claims")
    op.drop_table("quota_overrides")
