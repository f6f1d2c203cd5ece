"""Crash-safe rounds: the open round of each run (its selected clients and tasks) and every
accepted update, durable before it is acknowledged; over-selection per run. Example
counts become 64-bit (a client may declare up to 2^40 examples; PostgreSQL's INTEGER is
32-bit).

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("over_selection", sa.Float(), nullable=False, server_default="0"))
    for table in ("rounds", "participations"):
        with op.batch_alter_table(table) as batch:
            batch.alter_column("num_examples", type_=sa.BigInteger(), existing_type=sa.Integer())
    op.create_table(
        "open_rounds",
        sa.Column("run_id", sa.String(64), sa.ForeignKey("runs.id"), primary_key=True),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column("sample_rate", sa.Float(), nullable=False),
        sa.Column("extended", sa.Boolean(), nullable=False),
        sa.Column("selected", sa.JSON(), nullable=False),
        sa.Column("tasks", sa.JSON(), nullable=False),
        sa.Column("evaluated", sa.JSON(), nullable=False),
        sa.Column("train_seconds", sa.Float(), nullable=False),
        sa.Column("opened_at", TS, nullable=False),
    )
    op.create_table(
        "accepted_updates",
        sa.Column("run_id", sa.String(64), sa.ForeignKey("runs.id"), primary_key=True),
        sa.Column("round", sa.Integer(), primary_key=True),
        sa.Column("client_id", sa.String(64), primary_key=True),
        sa.Column("task_id", sa.String(64), nullable=False),
        sa.Column("idempotency_key", sa.String(128), nullable=False),
        sa.Column("num_examples", sa.BigInteger(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("path", sa.String(1000), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("accepted_at", TS, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("accepted_updates")
    op.drop_table("open_rounds")
    for table in ("rounds", "participations"):
        with op.batch_alter_table(table) as batch:
            batch.alter_column("num_examples", type_=sa.Integer(), existing_type=sa.BigInteger())
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("over_selection")
