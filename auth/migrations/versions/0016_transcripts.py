"""Opt-in transcripts: a flag per user and per team, and the kept generations (metadata in the clear, the text
encrypted).

Revision ID: 0016
Revises: 0015
"""

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"


def upgrade():
    # A plain ALTER TABLE ADD COLUMN: batch mode would copy the users table, which tokens reference.
    op.add_column("users", sa.Column("transcripts", sa.Boolean, nullable=False, server_default=sa.false()))
    op.add_column("teams", sa.Column("transcripts", sa.Boolean, nullable=False, server_default=sa.false()))
    op.create_table(
        "transcripts",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("team", sa.String(64)),  # the team the request counted against, as it was then
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model", sa.String(128)),
        sa.Column("route", sa.String(64), nullable=False),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("kid", sa.String(64), nullable=False),
        sa.Column("ciphertext", sa.LargeBinary, nullable=False),
    )
    op.create_index("ix_transcripts_created_at", "transcripts", ["created_at"])
    op.create_index("ix_transcripts_user_created", "transcripts", ["user_id", "created_at"])
    op.create_index("ix_transcripts_team_created", "transcripts", ["team", "created_at"])


def downgrade():
    op.drop_index("ix_transcripts_team_created", "transcripts")
    op.drop_index("ix_transcripts_user_created", "transcripts")
    op.drop_index("ix_transcripts_created_at", "transcripts")
    op.drop_table("transcripts")
    with op.batch_alter_table("teams") as batch:
        batch.drop_column("transcripts")
    op.drop_column("users", "transcripts")
