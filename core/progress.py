"""Progress of a running job: recorded from its events (by the worker), read back with an ETA."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from core.db import is_postgres
from core.models import Job, JobMetric
from core.states import expire_job

METRIC_FIELDS = ("epoch", "loss", "lr", "samples_per_s", "tokens_per_s", "mfu", "gpu_mem_gb")
LATEST_FIELDS = ("step", *METRIC_FIELDS)


def record_start(session: Session, job_id: str, attempt: int, event: dict[str, Any]) -> bool:
    """Store what the trainer's `start` event says (total steps). False if the attempt is stale. No commit."""
    values: dict[str, Any] = {"rate_origin": None}
    if event.get("total_steps") is not None:
        values["total_steps"] = int(event["total_steps"])
    if event.get("resumed_from_step") is not None:
        values["step"] = int(event["resumed_from_step"])
    return _update_current(session, job_id, attempt, values)


def record_steps(session: Session, job_id: str, attempt: int, events: list[dict[str, Any]]) -> int:
    """Store step events as metric rows (a resumed attempt overwrites the steps it re-trains) and
    refresh the job's cached progress. Writes of a stale attempt change nothing. Returns rows written;
    does not commit."""
    steps = [e for e in events if e.get("type", "step") == "step" and e.get("step") is not None]
    if not steps:
        return 0
    job = session.get(Job, job_id)
    if job is None or job.attempt != attempt:
        return 0
    rows = [
        {
            "job_id": job_id,
            "attempt": attempt,
            "step": int(e["step"]),
            "time": float(e.get("time") or time.time()),
            **{k: e.get(k) for k in METRIC_FIELDS},
        }
        for e in steps
    ]
    insert = postgresql.insert if is_postgres(session) else sqlite.insert
    stmt = insert(JobMetric).values(rows)
    stmt = stmt.on_conflict_do_update(
        index_elements=["job_id", "step"],
        set_={k: stmt.excluded[k] for k in ("attempt", "time", *METRIC_FIELDS)},
    )
    session.execute(stmt)
    last = steps[-1]
    values: dict[str, Any] = {
        "step": int(last["step"]),
        "epoch": last.get("epoch"),
        "latest": {k: last.get(k) for k in LATEST_FIELDS} | {"time": last.get("time")},
    }
    if job.rate_origin is None:
        first = steps[0]
        values["rate_origin"] = {"step": int(first["step"]), "time": float(first.get("time") or time.time())}
    _update_current(session, job_id, attempt, values)
    return len(rows)


def _update_current(session: Session, job_id: str, attempt: int, values: dict[str, Any]) -> bool:
    stmt = (
        update(Job)
        .where(Job.id == job_id, Job.attempt == attempt)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    won = session.execute(stmt).rowcount == 1
    expire_job(session, job_id)
    return won


def progress_of(job: Job, now: float | None = None) -> dict[str, Any]:
    """{step, total_steps, epoch, fraction, eta_s} from the cached fields; unknowns are None."""
    step, total = job.step, job.total_steps
    fraction = min(1.0, step / total) if step is not None and total else None
    eta = None
    origin, latest = job.rate_origin, job.latest
    if step is not None and total and origin and latest and latest.get("time"):
        done = step - origin["step"]
        elapsed = float(latest["time"]) - float(origin["time"])
        if done > 0 and elapsed > 0:
            remaining = max(0, total - step) * elapsed / done
            since_latest = max(0.0, (now or time.time()) - float(latest["time"]))
            eta = max(0.0, remaining - since_latest)
    if job.state in ("succeeded",):
        fraction, eta = 1.0 if total else fraction, 0.0
    return {"step": step, "total_steps": total, "epoch": job.epoch, "fraction": fraction, "eta_s": eta}
