"""Store a job's step metrics and its cached progress (step, total, epoch, latest) in the database."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from core.models import Job, JobMetric
from core.progress import LATEST_FIELDS
from trainer.events import EVAL_METRIC_FIELDS, STEP_METRIC_FIELDS

# What a job_metrics row keeps besides its key (step), attempt and time: from the step's `step` event,
# and from its `eval` event (merged into the same row, whichever came first).
STEP_COLUMNS = tuple(f for f in STEP_METRIC_FIELDS if f not in ("step", "time"))


def metric_row(job_id: str, attempt: int, event: dict[str, Any]) -> dict[str, Any]:
    """A job_metrics row from a `step` or an `eval` event (only that event's columns)."""
    columns = EVAL_METRIC_FIELDS if event.get("type") == "eval" else STEP_COLUMNS
    row = {"job_id": job_id, "attempt": attempt, "step": int(event["step"]), "time": float(event["time"])}
    row.update({name: event.get(name) for name in columns})
    return row


def backfill_metrics(session: Session, *, job_id: str, attempt: int, events_path: Path) -> int:
    """Store step and eval events an earlier attempt wrote but never stored (its worker died between the
    trainer writing them and the next flush); returns how many. Does not commit."""
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
            if not isinstance(event, dict):
                continue
            # An eval at the newest stored step may be what was lost (it comes after its step); storing
            # it again is harmless (an upsert).
            if (event.get("type") == "step" and int(event["step"]) > (stored or 0)) or (
                event.get("type") == "eval" and int(event["step"]) >= (stored or 0)
            ):
                steps.append(event)
    if steps:
        store_metrics(session, job_id=job_id, attempt=attempt, steps=steps, fields={})
    return len(steps)


def store_metrics(
    session: Session, *, job_id: str, attempt: int, steps: list[dict[str, Any]], fields: dict[str, Any]
) -> bool:
    """Upsert the `step` and `eval` events in `steps` (a resumed attempt re-trains steps after its
    checkpoint: the newest wins) and update the job's progress, only while `attempt` is still the
    job's. Returns False if fenced off. Does not commit."""
    evals = [e for e in steps if e.get("type") == "eval"]
    steps = [e for e in steps if e.get("type") != "eval"]
    values: dict[str, Any] = dict(fields)
    if steps or evals:
        # The newest eval loss stays in `latest` while later steps replace the rest.
        latest = dict(session.scalar(select(Job.latest).where(Job.id == job_id)) or {})
        if steps:
            last = steps[-1]
            values.update(step=int(last["step"]), epoch=last.get("epoch"))
            latest.update({name: last.get(name) for name in LATEST_FIELDS if name not in EVAL_METRIC_FIELDS})
            latest["time"] = last.get("time")
        if evals:
            latest.update({name: evals[-1].get(name) for name in EVAL_METRIC_FIELDS})
        values["latest"] = latest
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
    _upsert(session, [metric_row(job_id, attempt, e) for e in steps], STEP_COLUMNS, also=("time",))
    _upsert(session, [metric_row(job_id, attempt, e) for e in evals], EVAL_METRIC_FIELDS)
    return True


def _upsert(session: Session, rows: list[dict[str, Any]], columns: tuple[str, ...], also: tuple[str, ...] = ()) -> None:
    """Insert rows, or on a stored (job, step) set only `columns` (and `also`): a step's and its eval's
    values share a row."""
    if not rows:
        return
    # One row per step (the newest wins): Postgres refuses to upsert a row twice in one statement.
    rows = list({row["step"]: row for row in rows}.values())
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    stmt = dialect.insert(JobMetric).values(rows)
    stmt = stmt.on_conflict_do_update(
        index_elements=["job_id", "step"],
        set_={name: stmt.excluded[name] for name in ("attempt", *also, *columns)},
    )
    session.execute(stmt)
