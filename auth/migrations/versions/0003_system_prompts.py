"""Per-user allow-list of system prompts (JSON list; NULL means any).

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade():
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("system_prompts", sa.Text))


def downgrade():
    with op.batch_alter_table("users") as batch:
        batch.drop_column("system_prompts")
