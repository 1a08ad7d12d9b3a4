"""jobs.suffix and jobs.metadata: what the OpenAI fine-tuning view (/v1/fine_tuning/jobs) is given
beside the spec, the fine-tuned model name's suffix and up to 16 string pairs to list jobs by

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

JsonType = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    # Plain ADD COLUMNs (nullable, no default): no table rebuild on SQLite, no rewrite on Postgres.
    op.add_column("jobs", sa.Column("suffix", sa.String(length=64), nullable=True))
    op.add_column("jobs", sa.Column("metadata", JsonType, nullable=True))


def downgrade() -> None:
    # A plain DROP COLUMN (SQLite >= 3.35), as in 0005 and 0007: batch mode would rebuild `jobs`, and
    # dropping the old table cascades to its metrics on SQLite.
    op.drop_column("jobs", "metadata")
    op.drop_column("jobs", "suffix")
