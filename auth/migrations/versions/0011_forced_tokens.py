"""Thinking that ends in time: a usage row counts the tokens fed in to end a thinking early.

Revision ID: 0011
Revises: 0010

Existing rows forced nothing (0).
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"


def upgrade():
    with op.batch_alter_table("usage") as batch:
        batch.add_column(sa.Column("forced_tokens", sa.Integer, nullable=False, server_default="0"))


def downgrade():
    with op.batch_alter_table("usage") as batch:
        batch.drop_column("forced_tokens")
