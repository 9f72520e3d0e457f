"""Prefix cache: a usage row counts the prompt tokens read from the engine's prefix cache, not prefilled.

Revision ID: 0012
Revises: 0011

Existing rows read none from it (0).
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"


def upgrade():
    with op.batch_alter_table("usage") as batch:
        batch.add_column(sa.Column("cached_tokens", sa.Integer, nullable=False, server_default="0"))


def downgrade():
    with op.batch_alter_table("usage") as batch:
        batch.drop_column("cached_tokens")
