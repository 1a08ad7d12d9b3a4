"""jobs.paused_at: a paused job (the OpenAI view's pause) is not placed, and a running one is stopped with
a checkpoint and requeued, until it is resumed

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from core.models import UTCDateTime

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("paused_at", UTCDateTime(), nullable=True))


def downgrade() -> None:
    # A plain DROP COLUMN (SQLite >= 3.35), as in 0005 and 0007: batch mode would rebuild `jobs`.
    op.drop_column("jobs", "paused_at")
