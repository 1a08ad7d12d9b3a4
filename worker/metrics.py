"""Store a job's step metrics and its cached progress (step, total, epoch, latest) in the database."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from core.models import Job, JobMetric
from trainer.events import STEP_METRIC_FIELDS

LATEST_FIELDS = ("step", "loss", "lr", "samples_per_s", "tokens_per_s", "mfu", "gpu_mem_gb", "epoch")
# The step fields a job_metrics row keeps besides its key (step) and time.
METRIC_FIELDS = tuple(f for f in STEP_METRIC_FIELDS if f not in ("step", "time"))


def metric_row(job_id: str, attempt: int, event: dict[str, Any]) -> dict[str, Any]:
    """A job_metrics row from a `step` event."""
    row = {"job_id": job_id, "attempt": attempt, "step": int(event["step"]), "time": float(event["time"])}
    row.update({name: event.get(name) for name in METRIC_FIELDS})
    return row


def backfill_metrics(session: Session, *, job_id: str, attempt: int, events_path: Path) -> int:
    """Store step events an earlier attempt wrote but never stored (its worker died between the trainer
    writing them and the next flush); returns how many. Does not commit."""
    if not events_path.exists():
        return 0
    stored = session.scalar(select(func.max(JobMetric.step)).where(JobMetric.job_id == job_id))
    steps = []
    with events_path.open("rb") as f:
        for raw in f:
            try:
                event = json.loads(raw)
            except ValueError:
                continue  # a torn last line
            if isinstance(event, dict) and event.get("type") == "step" and int(event["step"]) > (stored or 0):
                steps.append(event)
    if steps:
        store_metrics(session, job_id=job_id, attempt=attempt, steps=steps, fields={})
    return len(steps)


def store_metrics(
    session: Session, *, job_id: str, attempt: int, steps: list[dict[str, Any]], fields: dict[str, Any]
) -> bool:
    """Upsert the steps (a resumed attempt re-trains steps after its checkpoint: the newest wins) and
    update the job's progress, only while `attempt` is still the job's. Returns False if fenced off.
    Does not commit."""
    values: dict[str, Any] = dict(fields)
    if steps:
        last = steps[-1]
        values.update(step=int(last["step"]), epoch=last.get("epoch"))
        values["latest"] = {name: last.get(name) for name in LATEST_FIELDS} | {"time": last.get("time")}
    fenced = (
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.attempt == attempt)
            .values(**values)
            .execution_options(synchronize_session=False)
        ).rowcount
        == 0
    )
    if fenced:
        return False
    if steps:
        # One row per step (the newest wins): Postgres refuses to upsert a row twice in one statement.
        rows = list({int(e["step"]): metric_row(job_id, attempt, e) for e in steps}.values())
        dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
        stmt = dialect.insert(JobMetric).values(rows)
        stmt = stmt.on_conflict_do_update(
            index_elements=["job_id", "step"],
            set_={name: stmt.excluded[name] for name in ("attempt", "time", *METRIC_FIELDS)},
        )
        session.execute(stmt)
    return True
