"""Table definitions (SQLAlchemy Core). Migrations in migrations/versions create them."""

from __future__ import annotations

from sqlalchemy import JSON, Column, Float, Index, Integer, MetaData, String, Table

metadata = MetaData()

vms = Table(
    "vms",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("customer_id", String(128), nullable=False),
    Column("config", JSON, nullable=False),
    Column("state", String(16), nullable=False),
    Column("backend", String(16), nullable=False),
    Column("pid", Integer, nullable=True),
    Column("pid_start_time", Integer, nullable=True),
    Column("backend_info", JSON, nullable=False),
    Column("node", String(128), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("deleted_at", Float, nullable=True),
    # ListVms: its count is answered from this index alone, its page read in order
    # (migrations/versions/0005_vm_pages.py; tests/unit/test_sqlite_store.py checks the plans).
    Index("ix_vms_customer_page", "customer_id", "deleted_at", "created_at", "id", "state"),
    # /metrics's VMs by state and backend, counted from this index alone
    # (0007_vms_state_backend.py).
    Index("ix_vms_state_backend", "state", "deleted_at", "backend"),
)
