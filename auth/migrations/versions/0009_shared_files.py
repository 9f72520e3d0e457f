"""Past one server: batch files in the database, and which runner holds a running batch line.

Revision ID: 0009
Revises: 0008

Files written before this revision stay in `files_dir` and are still read from there.
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"


def upgrade():
    op.create_table(
        "file_chunks",
        sa.Column("file_id", sa.String(64), primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("data", sa.LargeBinary, nullable=False),
    )
    with op.batch_alter_table("batch_lines") as batch:
        batch.add_column(sa.Column("owner", sa.String(128)))
        batch.add_column(sa.Column("claimed_at", sa.DateTime(timezone=True)))


def downgrade():
    with op.batch_alter_table("batch_lines") as batch:
        batch.drop_column("claimed_at")
        batch.drop_column("owner")
    op.drop_table("file_chunks")
