"""Batches and files under the live rules: per-user storage quotas, and files that expire.

Revision ID: 0010
Revises: 0009

Existing users keep the server defaults (NULL quotas); existing files never expire (NULL expires_at).
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
QUOTAS = (("max_files", sa.Integer), ("max_stored_bytes", sa.BigInteger), ("max_open_batches", sa.Integer),
          ("daily_batches", sa.Integer))


def upgrade():
    with op.batch_alter_table("users") as batch:
        for name, kind in QUOTAS:
            batch.add_column(sa.Column(name, kind))
    with op.batch_alter_table("files") as batch:
        batch.add_column(sa.Column("expires_at", sa.DateTime(timezone=True)))
        batch.create_index("ix_files_expires_at", ["expires_at"])


def downgrade():
    with op.batch_alter_table("files") as batch:
        batch.drop_index("ix_files_expires_at")
        batch.drop_column("expires_at")
    with op.batch_alter_table("users") as batch:
        for name, _ in reversed(QUOTAS):
            batch.drop_column(name)
