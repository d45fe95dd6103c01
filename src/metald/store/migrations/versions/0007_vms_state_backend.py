"""/metrics's VMs by state and backend: the index (state, deleted_at, backend).

/metrics counts the VMs not deleted by state and backend (issue 9). With 0005's
(state, deleted_at) the backend of every row had to be read from the table; this index holds
every column the count tests and groups by. Asked for each state (`state IN (...)` and
`deleted_at IS NULL`), SQLite searches the index range of each state's undeleted rows, in
backend order: no table read, no sort, and deleted rows (they accumulate: ids are never
reused) are not even visited (tests/unit/test_sqlite_store.py checks the plan). It extends
the index it replaces, so the lookups by state that used that one still can.

Follows issue 9's metering migration, 0006 (vm_metrics).

Revision ID: 0007_vms_state_backend
Revises: 0006_vm_metrics
"""

from __future__ import annotations

from alembic import op

revision = "0007_vms_state_backend"
down_revision = "0006_vm_metrics"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_vms_state_backend", "vms", ["state", "deleted_at", "backend"])
    op.drop_index("ix_vms_state_deleted", table_name="vms")


def downgrade() -> None:
    op.create_index("ix_vms_state_deleted", "vms", ["state", "deleted_at"])
    op.drop_index("ix_vms_state_backend", table_name="vms")
