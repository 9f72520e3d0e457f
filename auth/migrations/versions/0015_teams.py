"""Teams: a daily token budget, a concurrency cap and a rate limit shared by their members; a user is in at
most one team, and a usage row names the team it counted against.

Revision ID: 0015
Revises: 0014

Existing users are in no team; existing usage rows counted against none (NULL).
"""

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"


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
    # Added in place: rebuilding `users` (Alembic's batch mode on SQLite) would break the foreign keys to it.
    if op.get_bind().dialect.name == "sqlite":  # its ALTER TABLE ADD COLUMN takes a REFERENCES clause
        op.execute("ALTER TABLE users ADD COLUMN team_id INTEGER REFERENCES teams (id)")
    else:
        op.add_column("users", sa.Column("team_id", sa.Integer))
        op.create_foreign_key("users_team_id_fkey", "users", "teams", ["team_id"], ["id"])
    op.create_index("ix_users_team_id", "users", ["team_id"])
    op.add_column("usage", sa.Column("team", sa.String(64)))
    op.create_index("ix_usage_team_at", "usage", ["team", "at"])


def downgrade():
    op.drop_index("ix_usage_team_at", "usage")
    with op.batch_alter_table("usage") as batch:
        batch.drop_column("team")
    op.drop_index("ix_users_team_id", "users")
    if op.get_bind().dialect.name != "sqlite":  # SQLite's batch rebuild of the table drops it with the column
        op.drop_constraint("users_team_id_fkey", "users", type_="foreignkey")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("team_id")
    op.drop_table("teams")
