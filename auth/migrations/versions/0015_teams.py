"""Teams: a daily token budget, a concurrency cap and a rate limit shared by their members; a user is in at
most one team, and a usage row names the team it counted against.

Revision ID: 0015
Revises: 0013

Existing users are in no team; existing usage rows counted against none (NULL).
"""

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0013"


def upgrade():
    op.create_table(
        "teams",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("rate_limit", sa.String(200)),
        sa.Column("daily_tokens", sa.Integer),
        sa.Column("max_concurrent", sa.Integer),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("team_id", sa.Integer))
        batch.create_foreign_key("fk_users_team_id", "teams", ["team_id"], ["id"], ondelete="SET NULL")
        batch.create_index("ix_users_team_id", ["team_id"])
    with op.batch_alter_table("usage") as batch:
        batch.add_column(sa.Column("team", sa.String(64)))
        batch.create_index("ix_usage_team_at", ["team", "at"])


def downgrade():
    with op.batch_alter_table("usage") as batch:
        batch.drop_index("ix_usage_team_at")
        batch.drop_column("team")
    with op.batch_alter_table("users") as batch:
        batch.drop_index("ix_users_team_id")
        batch.drop_constraint("fk_users_team_id", type_="foreignkey")
        batch.drop_column("team_id")
    op.drop_table("teams")
