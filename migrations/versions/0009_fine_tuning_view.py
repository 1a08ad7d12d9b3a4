"""jobs.suffix and jobs.metadata: what the OpenAI fine-tuning view (/v1/fine_tuning/jobs) is given
beside the spec, the fine-tuned model name's suffix and up to 16 string pairs to list jobs by;
datasets.format widened to 32 characters: an upload records the data format it was checked as
(chat, prompt_completion, jsonl or text)

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
    # Nothing references datasets, so SQLite's batch rebuild of it cascades nowhere.
    with op.batch_alter_table("datasets") as batch:
        batch.alter_column(
            "format", type_=sa.String(length=32), existing_type=sa.String(length=16), existing_nullable=False
        )


def downgrade() -> None:
    # Before 0009 an upload of chat or prompt_completion records was recorded as jsonl (its file format).
    op.execute("UPDATE datasets SET format = 'jsonl' WHERE format IN ('chat', 'prompt_completion')")
    with op.batch_alter_table("datasets") as batch:
        batch.alter_column(
            "format", type_=sa.String(length=16), existing_type=sa.String(length=32), existing_nullable=False
        )
    # A plain DROP COLUMN (SQLite >= 3.35), as in 0005 and 0007: batch mode would rebuild `jobs`, and
    # dropping the old table cascades to its metrics on SQLite.
    op.drop_column("jobs", "metadata")
    op.drop_column("jobs", "suffix")
