"""Several models and the response cache: a user's allow-list of models; the model and the cache in usage.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"


def upgrade():
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("models", sa.Text))
    with op.batch_alter_table("usage") as batch:
        batch.add_column(sa.Column("model", sa.String(128)))
        batch.add_column(sa.Column("cached", sa.Boolean, nullable=False, server_default=sa.false()))


def downgrade():
    with op.batch_alter_table("usage") as batch:
        batch.drop_column("cached")
        batch.drop_column("model")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("models")
