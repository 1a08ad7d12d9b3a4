"""The ORM models: jobs, their step metrics, boxes and their GPUs; users, their API tokens and uploads.

The schema is created only by migrations (migrations/versions); these classes must match them (a
test compares the two).
"""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    TypeDecorator,
    UniqueConstraint,
    false,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

JsonType = JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


_B32 = "0123456789abcdefghjkmnpqrstvwxyz"


def new_job_id() -> str:
    """A short, URL-safe id that sorts by creation time: 'j' + 9 chars of ms time + 8 random chars."""
    ms = int(time.time() * 1000)
    stamp = "".join(_B32[(ms >> (5 * i)) & 31] for i in reversed(range(9)))
    return "j" + stamp + "".join(secrets.choice(_B32) for _ in range(8))


class Base(DeclarativeBase):
    pass


class Job(Base):
    """A training job: its spec, where it runs, its state and cached progress."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_job_id)
    name: Mapped[str] = mapped_column(String(100))
    owner: Mapped[str] = mapped_column(String(100), index=True)
    state: Mapped[str] = mapped_column(String(16))
    spec: Mapped[dict[str, Any]] = mapped_column(JsonType)
    gpus: Mapped[int] = mapped_column(Integer)
    priority: Mapped[int] = mapped_column(Integer, default=0)

    # Placement, set by the scheduler when the job leaves `queued`.
    box: Mapped[str | None] = mapped_column(String(64))
    gpu_ids: Mapped[list[int] | None] = mapped_column(JsonType)

    # Attempts and the lease of the supervisor running the current attempt.
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    error: Mapped[dict[str, Any] | None] = mapped_column(JsonType)

    # Submission de-duplication: the same (owner, key) names one job; the hash tells bodies apart.
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_hash: Mapped[str | None] = mapped_column(String(64))

    # Progress cached from the event stream so GET /jobs/{id} needs no metrics scan.
    total_steps: Mapped[int | None] = mapped_column(Integer)
    step: Mapped[int | None] = mapped_column(Integer)
    epoch: Mapped[int | None] = mapped_column(Integer)
    latest: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    rate_origin: Mapped[dict[str, Any] | None] = mapped_column(JsonType)  # {"step", "time"}: for the ETA
    # Bytes under the run directory, measured by the worker after each checkpoint and at the end of an
    # attempt, and after checkpoints are pruned (NULL: never measured). GET /jobs/{id} reads it, never the disk.
    disk_bytes: Mapped[int | None] = mapped_column(BigInteger)
    # Stored by each scheduling pass (core.queue.refresh), so reads never walk the queue: the 1-based
    # position of a queued job (NULL otherwise) and when it should start (NULL: not known).
    queue_position: Mapped[int | None] = mapped_column(Integer)
    start_eta_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Given by a job created through the OpenAI fine-tuning view (api/openai): the model-name suffix and
    # up to 16 string pairs to filter by. NULL for jobs submitted as specs.
    suffix: Mapped[str | None] = mapped_column(String(64))
    job_metadata: Mapped[dict[str, str] | None] = mapped_column("metadata", JsonType)
    # Set: the job is paused (POST /v1/fine_tuning/jobs/{id}/pause). A queued one is not placed; a running
    # one is stopped by its worker with a checkpoint and requeued. Cleared by resume.
    paused_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (
        Index("ix_jobs_state_priority_created", "state", "priority", "created_at"),
        Index("ix_jobs_created_id", "created_at", "id"),
        Index("ix_jobs_state_queue_position", "state", "queue_position"),
        Index("ix_jobs_start_eta_at", "start_eta_at"),
        Index("ix_jobs_owner_state", "owner", "state"),
        Index("ix_jobs_owner_created_id", "owner", "created_at", "id"),
        UniqueConstraint("owner", "idempotency_key", name="uq_jobs_owner_idempotency_key"),
    )


class JobMetric(Base):
    """One optimizer step of a job (its `step` event, and its `eval` event if it had one), for history and charts."""

    __tablename__ = "job_metrics"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(Integer)
    epoch: Mapped[int | None] = mapped_column(Integer)
    loss: Mapped[float | None] = mapped_column(Float)
    lr: Mapped[float | None] = mapped_column(Float)
    samples_per_s: Mapped[float | None] = mapped_column(Float)
    tokens_per_s: Mapped[float | None] = mapped_column(Float)
    mfu: Mapped[float | None] = mapped_column(Float)
    gpu_mem_gb: Mapped[float | None] = mapped_column(Float)
    eval_loss: Mapped[float | None] = mapped_column(Float)  # from the `eval` event at this step, if any
    time: Mapped[float] = mapped_column(Float)  # Unix seconds, as in the event

    __table_args__ = (UniqueConstraint("job_id", "step", name="uq_job_metrics_job_step"),)


class Box(Base):
    """A machine that runs jobs: its Celery queue and the last time its worker said it was alive."""

    __tablename__ = "boxes"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    queue: Mapped[str] = mapped_column(String(200))
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    gpus: Mapped[list[Gpu]] = relationship(back_populates="box_row", order_by="Gpu.index")


class Gpu(Base):
    """One GPU (or CPU slot) of a box; `job_id` is the allocation (NULL: free)."""

    __tablename__ = "gpus"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    box: Mapped[str] = mapped_column(ForeignKey("boxes.name", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(200))
    memory_mb: Mapped[int | None] = mapped_column(Integer)
    memory_used_mb: Mapped[int | None] = mapped_column(Integer)
    # Processes outside trainbox use it (NVML, checked by its box's worker): not placed until they leave.
    busy: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), index=True)

    box_row: Mapped[Box] = relationship(back_populates="gpus")

    __table_args__ = (UniqueConstraint("box", "index", name="uq_gpus_box_index"),)


class User(Base):
    """Someone who submits jobs; `is_admin` sees and cancels every job. Limits: NULL = the setting."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # Jobs and datasets name their owner by this (immutable) name.
    name: Mapped[str] = mapped_column(String(100), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    max_gpus: Mapped[int | None] = mapped_column(Integer)
    max_queued: Mapped[int | None] = mapped_column(Integer)
    max_runtime_s: Mapped[int | None] = mapped_column(Integer)
    max_priority: Mapped[int | None] = mapped_column(Integer)
    submit_rate_per_minute: Mapped[int | None] = mapped_column(Integer)
    max_datasets: Mapped[int | None] = mapped_column(Integer)
    max_dataset_bytes: Mapped[int | None] = mapped_column(BigInteger)
    max_tokens: Mapped[int | None] = mapped_column(Integer)
    max_disk_bytes: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    tokens: Mapped[list[ApiToken]] = relationship(back_populates="user", order_by="ApiToken.created_at")


class ApiToken(Base):
    """An API token: `id` is public (listing, revoking), only the SHA-256 of the secret is kept."""

    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    secret_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    user: Mapped[User] = relationship(back_populates="tokens")


class Dataset(Base):
    """An uploaded training file, stored as `<data root>/uploads/<id>`; only its owner may train on it."""

    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(ForeignKey("users.name", ondelete="CASCADE"), index=True)
    filename: Mapped[str] = mapped_column(String(200))
    # How the file was checked, as a spec's dataset.format reads it: chat, prompt_completion, jsonl (JSONL
    # text records) or text (plain text lines).
    format: Mapped[str] = mapped_column(String(32))
    text_field: Mapped[str] = mapped_column(String(100))
    records: Mapped[int] = mapped_column(Integer)
    bytes: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
