"""Rows for tests, inserted through the ORM (the API tests go through HTTP instead)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.models import Gpu, Job, new_job_id, utcnow
from core.scheduler import queued_order
from core.states import JobState

_seq = [0]


def add_job(session: Session, *, gpus: int = 1, priority: int = 0, state: str = "queued", **kw: Any) -> Job:
    """A committed job; creation times strictly increase in call order (FIFO tests rely on it)."""
    _seq[0] += 1
    now = utcnow() + timedelta(microseconds=_seq[0])
    job = Job(
        id=new_job_id(),
        name=kw.pop("name", f"job-{_seq[0]}"),
        owner=kw.pop("owner", "alice"),
        state=JobState(state).value,
        spec={"name": "t", "gpus": gpus},
        gpus=gpus,
        priority=priority,
        attempt=kw.pop("attempt", 1),
        max_attempts=3,
        cancel_requested=kw.pop("cancel_requested", False),
        created_at=kw.pop("created_at", now),
        updated_at=now,
        **kw,
    )
    session.add(job)
    session.commit()
    return job


def queue_positions(session: Session) -> dict[str, int]:
    """1-based position of every queued job in scheduling order, computed (not the stored column)."""
    ids = session.scalars(queued_order(select(Job.id))).all()
    return {job_id: i for i, job_id in enumerate(ids, 1)}


def held_gpus(session: Session) -> dict[str, list[tuple[str, int]]]:
    """job id -> [(box, gpu index)] for every allocated GPU: a consistency view."""
    out: dict[str, list[tuple[str, int]]] = {}
    for box, index, job_id in session.execute(select(Gpu.box, Gpu.index, Gpu.job_id).where(Gpu.job_id.is_not(None))):
        out.setdefault(job_id, []).append((box, index))
    return out
