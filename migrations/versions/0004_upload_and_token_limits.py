"""users: per-user overrides of the upload quota (count, total bytes) and of the live-token cap

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("max_datasets", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("max_dataset_bytes", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("max_tokens", sa.Integer(), nullable=True))


def downgrade() -> None:
    # A plain DROP COLUMN (SQLite >= 3.35): batch mode would rebuild `users` on SQLite, and with foreign
    # keys on, dropping the old table cascades to api_tokens and datasets.
    op.drop_column("users", "max_tokens")
    op.drop_column("users", "max_dataset_bytes")
    op.drop_column("users", "max_datasets")
