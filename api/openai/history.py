"""A fine-tuning job's events and checkpoints, newest first, read from the job's row, its stored metric
history (core.jobs) and its run directory's checkpoints (api.artifacts): nothing is kept for this view.

Events are numbered by a key that orders them: 0 the job's creation, 1 its start, 2 + N the metrics of
step N, END its end. `ftevent-<job id>-<key>` is the id, and `after=<id>` pages to the older ones.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.artifacts import list_artifacts
from api.openai.errors import BadRequest
from api.openai.mapping import job_ref, model_name
from api.openai.schemas import CheckpointMetrics, JobCheckpoint, JobEvent
from core.models import Job, JobMetric
from core.states import JobState

END = 2**40
MAX_STEP = 2**31 - 1
_EVENT = re.compile(r"ftevent-([0-9a-z]+)-([0-9]+)")
_CHECKPOINT = re.compile(r"ftckpt-([0-9a-z]+)-([0-9]+)")


def _bound(after: str | None, pattern: re.Pattern[str], job: Job, what: str) -> int:
    """The key (or step) below which the next page starts; 400 for an id of another job or kind."""
    if after is None:
        return END + 1
    m = pattern.fullmatch(after)
    if m is None or m.group(1) != job.id:
        raise BadRequest(f"after {after!r} is not {what} of this job", ["query", "after"], type_="invalid_value")
    return int(m.group(2))


def _fmt(x: float | None) -> str:
    return f"{x:.4f}" if x is not None else "n/a"


def step_event(job: Job, m: JobMetric) -> JobEvent:
    total = job.total_steps
    message = f"Step {m.step}/{total if total is not None else '?'}: training loss={_fmt(m.loss)}"
    if m.eval_loss is not None:
        message += f", validation loss={_fmt(m.eval_loss)}"
    data: dict[str, Any] = {
        "step": m.step,
        "train_loss": m.loss,
        "valid_loss": m.eval_loss,
        "total_steps": total,
        "epoch": m.epoch,
        "learning_rate": m.lr,
        "tokens_per_s": m.tokens_per_s,
    }
    return JobEvent(
        id=f"ftevent-{job.id}-{m.step + 2}",
        created_at=int(m.time),
        level="info",
        message=message,
        type="metrics",
        data=data,
    )


def end_event(job: Job) -> JobEvent:
    state = JobState(job.state)
    error = job.error or {}
    if state is JobState.SUCCEEDED:
        level, message = "info", "The job has successfully completed"
    elif state is JobState.FAILED:
        level, message = "error", f"The job failed ({error.get('type', 'error')}): {error.get('message', '')}"
    else:
        level, message = "info", "The job was cancelled"
    return _message(job, END, job.finished_at or job.updated_at, message, level)


def _message(job: Job, key: int, when: datetime, message: str, level: str = "info") -> JobEvent:
    return JobEvent(
        id=f"ftevent-{job.id}-{key}", created_at=int(when.timestamp()), level=level, message=message, type="message"
    )


def list_events(session: Session, job: Job, *, after: str | None, limit: int) -> tuple[list[JobEvent], bool]:
    """One page of the job's events, newest first, and whether older ones follow."""
    bound = _bound(after, _EVENT, job, "an event")
    out: list[JobEvent] = []
    if JobState(job.state).is_terminal() and bound > END:
        out.append(end_event(job))
    query = select(JobMetric).where(JobMetric.job_id == job.id).order_by(JobMetric.step.desc()).limit(limit + 1)
    if bound - 2 <= MAX_STEP:  # steps are 32-bit columns: a bound past them filters nothing
        query = query.where(JobMetric.step < bound - 2)
    out.extend(step_event(job, m) for m in session.scalars(query))
    if job.started_at is not None and bound > 1:
        out.append(_message(job, 1, job.started_at, "Fine-tuning job started"))
    if bound > 0:
        out.append(_message(job, 0, job.created_at, f"Created fine-tuning job: {job_ref(job.id)}"))
    return out[:limit], len(out) > limit


def list_checkpoints(
    session: Session, job: Job, run_dir: Path, *, after: str | None, limit: int
) -> tuple[list[JobCheckpoint], bool]:
    """One page of the job's complete checkpoints, newest first, with the metrics of their steps."""
    bound = _bound(after, _CHECKPOINT, job, "a checkpoint")
    found = [c for c in reversed(list_artifacts(run_dir)["checkpoints"]) if int(c["step"]) < bound]  # type: ignore[call-overload]
    page = found[:limit]
    steps = [int(c["step"]) for c in page]  # type: ignore[call-overload]
    metrics = {
        m.step: m
        for m in session.scalars(select(JobMetric).where(JobMetric.job_id == job.id, JobMetric.step.in_(steps)))
    }
    out = []
    for c, step in zip(page, steps, strict=True):
        m = metrics.get(step)
        try:
            created = int((run_dir / str(c["name"])).stat().st_mtime)
        except OSError:
            created = int(m.time) if m else int(job.created_at.timestamp())
        out.append(
            JobCheckpoint(
                id=f"ftckpt-{job.id}-{step}",
                created_at=created,
                fine_tuned_model_checkpoint=f"{model_name(job)}:ckpt-step-{step}",
                fine_tuning_job_id=job_ref(job.id),
                step_number=step,
                metrics=CheckpointMetrics(
                    step=step,
                    train_loss=m.loss if m else None,
                    valid_loss=m.eval_loss if m else None,
                    full_valid_loss=m.eval_loss if m else None,
                ),
            )
        )
    return out, len(found) > limit
