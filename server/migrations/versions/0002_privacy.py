"""Central DP: a run's privacy settings and its privacy ledger.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("privacy", sa.JSON(), nullable=False, server_default="{}"))
        batch.add_column(sa.Column("privacy_ledger", sa.JSON(), nullable=False, server_default="{}"))


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("privacy_ledger")
        batch.drop_column("privacy")
