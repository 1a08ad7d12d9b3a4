"""drop jobs.master_port and its unique index: the launcher serves the rendezvous store on a port the OS
assigns (torch elastic's agent store), so the scheduler no longer hands out ports

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The index first: SQLite refuses to drop an indexed column. A plain DROP COLUMN (SQLite >= 3.35),
    # as in 0005: batch mode would rebuild jobs, and with foreign keys on that cascades to its metrics.
    op.drop_index("uq_jobs_box_master_port", table_name="jobs")
    op.drop_column("jobs", "master_port")


def downgrade() -> None:
    # The column comes back empty: a job running at the downgrade keeps the port its launcher chose.
    op.add_column("jobs", sa.Column("master_port", sa.Integer(), nullable=True))
    op.create_index(
        "uq_jobs_box_master_port",
        "jobs",
        ["box", "master_port"],
        unique=True,
        sqlite_where=sa.text("master_port IS NOT NULL"),
        postgresql_where=sa.text("master_port IS NOT NULL"),
    )
