"""Token rotation: a successor names the token it replaces, and the replaced token its successor.

Revision ID: 0014
Revises: 0013

The replaced token's end of grace is its `revoked_at`, set in the future at rotation: the token works until
then and is refused from then on, like any revoked one. Existing rows replace nothing (NULL).
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"


def upgrade():
    with op.batch_alter_table("tokens") as batch:
        batch.add_column(sa.Column("replaces", sa.String(64)))
        batch.add_column(sa.Column("replaced_by", sa.String(64)))


def downgrade():
    with op.batch_alter_table("tokens") as batch:
        batch.drop_column("replaced_by")
        batch.drop_column("replaces")
