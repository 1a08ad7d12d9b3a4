"""queue positions: jobs.queue_position and jobs.start_eta_at, stored by each scheduling pass, so reading
a job or a page of jobs never walks the queue; indexes for the per-owner reads of submit and listing

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from core.models import UTCDateTime

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("queue_position", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("start_eta_at", UTCDateTime(), nullable=True))
    op.create_index("ix_jobs_state_queue_position", "jobs", ["state", "queue_position"])
    op.create_index("ix_jobs_start_eta_at", "jobs", ["start_eta_at"])
    op.create_index("ix_jobs_owner_state", "jobs", ["owner", "state"])
    op.create_index("ix_jobs_owner_created_id", "jobs", ["owner", "created_at", "id"])
    # Existing queues get their positions at the first scheduling pass (the worker's sweep runs one).


def downgrade() -> None:
    op.drop_index("ix_jobs_owner_created_id", "jobs")
    op.drop_index("ix_jobs_owner_state", "jobs")
    op.drop_index("ix_jobs_start_eta_at", "jobs")
    op.drop_index("ix_jobs_state_queue_position", "jobs")
    # A plain DROP COLUMN (SQLite >= 3.35), as in 0005: batch mode would rebuild jobs and cascade.
    op.drop_column("jobs", "start_eta_at")
    op.drop_column("jobs", "queue_position")
