"""API keys: one row per key, only the keyed hash of its secret.

`key_id` is the public part of a token (`mk_<key id>_<secret>`), unique: every
authenticated call with a key reads its row by it (one indexed lookup, no cache, so a
revocation holds on the next call). `secret_hash` is HMAC-SHA256(pepper, secret) with a
pepper kept outside the database (core/apikeys.py). Rows are never deleted: a revoked key
keeps its row (revoked_at), so its id is never handed out again and an audit row naming
"key:<key id>" can always be traced to its customer and role.

Revision ID: 0008_api_keys
Revises: 0007_vms_state_backend
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_api_keys"
down_revision = "0007_vms_state_backend"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("customer_id", sa.String(128), nullable=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("secret_hash", sa.LargeBinary(32), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=True),
        sa.Column("revoked_at", sa.Float, nullable=True),
        sa.Column("description", sa.String(256), nullable=False),
    )
    op.create_index("ux_api_keys_key_id", "api_keys", ["key_id"], unique=True)


def downgrade() -> None:
    op.drop_index("ux_api_keys_key_id", table_name="api_keys")
    op.drop_table("api_keys")
