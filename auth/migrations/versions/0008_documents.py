"""Documents as questions: what reading them cost, in usage.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
COLUMNS = ("document_pages", "document_images", "document_ms")


def upgrade():
    with op.batch_alter_table("usage") as batch:
        for name in COLUMNS:
            batch.add_column(sa.Column(name, sa.Integer, nullable=False, server_default="0"))


def downgrade():
    with op.batch_alter_table("usage") as batch:
        for name in reversed(COLUMNS):
            batch.drop_column(name)
