"""audit_log: the append-only, hash-chained audit log (store/audit_log.py), and audit_head,
the chain's last (seq, hash), written in the same transaction as the rows it follows.

Rows are numbered by `seq`, assigned by the writer as the head's seq plus one (not an
autoincrement): seqs are consecutive, so a deleted or inserted row shows as a gap or a
clash. Indexes serve `metald audit list --customer` and `--since`.

Revision ID: 0009_audit_log
Revises: 0008_api_keys
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_audit_log"
down_revision = "0008_api_keys"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_log",
        sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("at_ns", sa.BigInteger, nullable=False),
        sa.Column("actor", sa.String(256), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("customer_id", sa.String(128), nullable=True),
        sa.Column("method", sa.String(128), nullable=False),
        sa.Column("vm_id", sa.String(64), nullable=True),
        sa.Column("code", sa.String(32), nullable=False),
        sa.Column("source", sa.String(128), nullable=True),
        sa.Column("trace_id", sa.String(32), nullable=False),
        sa.Column("tenant_header", sa.String(256), nullable=True),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.create_index("ix_audit_log_customer", "audit_log", ["customer_id", "seq"])
    op.create_index("ix_audit_log_at", "audit_log", ["at_ns"])
    head = op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.bulk_insert(head, [{"id": 1, "seq": 0, "hash": "0" * 64}])


def downgrade() -> None:
    op.drop_table("audit_head")
    op.drop_index("ix_audit_log_at", table_name="audit_log")
    op.drop_index("ix_audit_log_customer", table_name="audit_log")
    op.drop_table("audit_log")
