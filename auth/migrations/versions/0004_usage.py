"""One usage row per generation, completed or failed.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade():
    op.create_table(
        "usage",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("user", sa.String(64), nullable=False),
        sa.Column("route", sa.String(64), nullable=False),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("prompt_tokens", sa.Integer, nullable=False),
        sa.Column("completion_tokens", sa.Integer, nullable=False),
        sa.Column("latency_ms", sa.Integer, nullable=False),
        sa.Column("finish_reason", sa.String(32)),
        sa.Column("request_id", sa.String(128), nullable=False),
    )
    op.create_index("ix_usage_user_at", "usage", ["user", "at"])


def downgrade():
    op.drop_index("ix_usage_user_at", "usage")
    op.drop_table("usage")
