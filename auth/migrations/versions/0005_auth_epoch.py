"""The access epoch: a value every change to who may do what replaces, so workers drop cached tokens.

Revision ID: 0005
Revises: 0004
"""

import uuid

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"


def upgrade():
    table = op.create_table(
        "auth_epoch",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("value", sa.String(64), nullable=False),
    )
    op.bulk_insert(table, [{"id": 1, "value": uuid.uuid4().hex}])


def downgrade():
    op.drop_table("auth_epoch")
