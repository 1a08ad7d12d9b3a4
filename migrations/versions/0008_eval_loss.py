"""job_metrics.eval_loss: a step's validation loss (the trainer's `eval` events), kept with the step's
training metrics so the history and charts carry both

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("job_metrics", sa.Column("eval_loss", sa.Float(), nullable=True))


def downgrade() -> None:
    # A plain DROP COLUMN (SQLite >= 3.35), as in 0005 and 0007: batch mode would rebuild the table.
    op.drop_column("job_metrics", "eval_loss")
