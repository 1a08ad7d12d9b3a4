"""Queue positions and start ETAs, stored on the jobs by each scheduling pass, so that reading a job or a
page of jobs costs the same however long the queue is.

`refresh` runs inside schedule()'s locked transaction, and schedule() runs after every submit, after a
queued job is cancelled, after every job ends and in the worker's sweep (every sweep_interval_s): what a
read shows is at most one pass old, and one sweep old when the pass after a change failed.

Positions (`jobs.queue_position`, 1-based in scheduling order, NULL outside `queued`):
- new jobs that sort after the current tail (every submit at a priority no higher than the last queued
  job's) are appended: one indexed read of the tail and one write per new job;
- anything else that changes the order (a job placed, cancelled, failed or sent back to the queue, a
  submit that jumps ahead) renumbers the queue once: its ids in order, and a write of the rows that moved.
A pass that changes nothing costs two indexed reads that find nothing.

ETAs (`jobs.start_eta_at`, an absolute time; reads show the seconds left): core.eta.start_etas replays
the scheduler over the head of the queue only (once every slot is held by a job whose run time is
unknown, no job behind has an ETA), so this is bounded by the number of GPUs, not the queue.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core.eta import start_etas
from core.models import Job
from core.scheduler import queued_order
from core.states import JobState

QUEUED = JobState.QUEUED.value
NOT_QUEUED = [s.value for s in JobState if s is not JobState.QUEUED]
ETA_SLACK_S = 1.0  # a stored ETA is rewritten only when it moved by at least this much


def refresh(session: Session, *, placed: bool = True, now: float | None = None) -> None:
    """Store every queued job's position and the head's start ETAs. Call holding the scheduler lock;
    does not commit. `placed`: the pass placed jobs (the GPUs' holders changed).

    A pass that only appended jobs behind a tail without an ETA leaves the ETAs as they are: no job gets
    or loses one (none behind a job without an ETA has one; a tail that fits no box aside, whose
    follower gets its ETA at the next sweep). Every other pass replays the head, so ETAs
    follow the running jobs' progress at least once per sweep."""
    if not refresh_positions(session) or placed:
        refresh_etas(session, now=time.time() if now is None else now)


def _order_key(priority: int, created_at: datetime, job_id: str) -> tuple[int, datetime, str]:
    return (-priority, created_at, job_id)


def refresh_positions(session: Session) -> bool:
    """Append new queued jobs at the tail, or renumber the queue when its order changed otherwise.
    True when all it did was append behind a tail that has no start ETA."""
    left = session.scalars(select(Job.id).where(Job.state.in_(NOT_QUEUED), Job.queue_position.is_not(None))).all()
    new = session.execute(
        queued_order(select(Job.id, Job.priority, Job.created_at).where(Job.queue_position.is_(None)))
    ).all()
    if not left and not new:
        return False
    if not left:
        tail = session.execute(
            select(Job.queue_position, Job.priority, Job.created_at, Job.id, Job.start_eta_at)
            .where(Job.state == QUEUED, Job.queue_position.is_not(None))
            .order_by(Job.queue_position.desc())
            .limit(1)
        ).first()
        if tail is None or _order_key(*new[0][1:], new[0][0]) > _order_key(tail[1], tail[2], tail[3]):
            last = tail[0] if tail is not None else 0
            session.execute(update(Job), [{"id": row[0], "queue_position": last + i} for i, row in enumerate(new, 1)])
            return tail is not None and tail[4] is None
    if left:
        session.execute(
            update(Job)
            .where(Job.id.in_(left))
            .values(queue_position=None, start_eta_at=None)
            .execution_options(synchronize_session=False)
        )
    rows = session.execute(queued_order(select(Job.id, Job.queue_position))).all()
    moved = [{"id": job_id, "queue_position": i} for i, (job_id, pos) in enumerate(rows, 1) if pos != i]
    if moved:
        session.execute(update(Job), moved)
    return False


def refresh_etas(session: Session, *, now: float) -> None:
    """Store the head's start ETAs as absolute times; clear those no job should show any more."""
    known = {job_id: eta for job_id, eta in start_etas(session, now=now).items() if eta is not None}
    holders = select(Job.id, Job.start_eta_at).where(Job.start_eta_at.is_not(None))
    stored = {r.id: r.start_eta_at for r in session.execute(holders)}
    writes: list[dict[str, Any]] = [{"id": job_id, "start_eta_at": None} for job_id in stored.keys() - known.keys()]
    for job_id, eta in known.items():
        old = stored.get(job_id)
        if old is None or abs(old.timestamp() - (now + eta)) >= ETA_SLACK_S:
            writes.append({"id": job_id, "start_eta_at": datetime.fromtimestamp(now + eta, UTC)})
    if writes:
        session.execute(update(Job), writes)


def start_eta_s(job: Job, now: float | None = None) -> float | None:
    """Seconds until a queued job should start, from its stored ETA (None: not queued, or not known)."""
    if job.state != QUEUED or job.start_eta_at is None:
        return None
    return round(max(0.0, job.start_eta_at.timestamp() - (time.time() if now is None else now)), 1)


def queue_position(job: Job) -> int | None:
    """A queued job's stored 1-based position (None outside the queue)."""
    return job.queue_position if job.state == QUEUED else None
