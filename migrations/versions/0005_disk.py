"""disk: jobs.disk_bytes (the run directory's size, measured by the worker) and users.max_disk_bytes
(the per-user override of the disk quota)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("disk_bytes", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("max_disk_bytes", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    # A plain DROP COLUMN (SQLite >= 3.35): batch mode would rebuild jobs and users on SQLite, and with
    # foreign keys on, dropping the old tables cascades to job_metrics, datasets and api_tokens.
    op.drop_column("users", "max_disk_bytes")
    op.drop_column("jobs", "disk_bytes")
