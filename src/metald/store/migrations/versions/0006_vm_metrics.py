"""vm_metrics (metering's outbox: usage records and billing notices, in the order stored)
and vm_meters (each VM's metering state: its last raw reading and cumulative record).

vm_metrics rows are numbered by `seq` (autoincrement: never reused, so the order of a VM's
entries survives deletes); `delivered_at` is NULL until billing took the entry. The index
(node, delivered_at, vm_id, seq) finds the undelivered entries of each VM in order, and
serves the pruning of old delivered ones. vm_meters holds one row per metered VM, written in
the same transaction as its records, so a restarted metald continues each VM's counters
from exactly the record it stored last.

Revision ID: 0006_vm_metrics
Revises: 0005_vm_pages
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_vm_metrics"
down_revision = "0005_vm_pages"
branch_labels = None
depends_on = None

_COUNTERS = (
    "cpu_time_ns",
    "memory_bytes",
    "disk_read_bytes",
    "disk_write_bytes",
    "network_rx_bytes",
    "network_tx_bytes",
)


def upgrade() -> None:
    op.create_table(
        "vm_metrics",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("node", sa.String(128), nullable=False),
        sa.Column("vm_id", sa.String(64), nullable=False),
        sa.Column("customer_id", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("timestamp_ns", sa.BigInteger, nullable=False),
        *(sa.Column(c, sa.BigInteger, nullable=False, server_default="0") for c in _COUNTERS),
        sa.Column("gap_from_ns", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("delivered_at", sa.Float, nullable=True),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_vm_metrics_outbox", "vm_metrics", ["node", "delivered_at", "vm_id", "seq"])
    op.create_table(
        "vm_meters",
        sa.Column("node", sa.String(128), primary_key=True),
        sa.Column("vm_id", sa.String(64), primary_key=True),
        sa.Column("customer_id", sa.String(128), nullable=False),
        sa.Column("vmm", sa.String(64), nullable=False),
        sa.Column("timestamp_ns", sa.BigInteger, nullable=False),
        *(sa.Column(f"raw_{c}", sa.BigInteger, nullable=False) for c in _COUNTERS),
        *(sa.Column(c, sa.BigInteger, nullable=False) for c in _COUNTERS),
    )


def downgrade() -> None:
    op.drop_table("vm_meters")
    op.drop_index("ix_vm_metrics_outbox", table_name="vm_metrics")
    op.drop_table("vm_metrics")
