"""Per-user quota fields and the audit trail.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade():
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("rate_limit", sa.String(200)))
        batch.add_column(sa.Column("daily_tokens", sa.Integer))
        batch.add_column(sa.Column("max_concurrent", sa.Integer))
    op.create_table(
        "audit",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False, index=True),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.String(200), nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("source", sa.String(100), nullable=False),
    )


def downgrade():
    op.drop_table("audit")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("max_concurrent")
        batch.drop_column("daily_tokens")
        batch.drop_column("rate_limit")
