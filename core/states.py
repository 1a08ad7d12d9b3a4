"""Job states, the allowed transitions, and the one function that changes a job's state.

    queued -> starting -> running -> succeeded | failed | cancelled
    queued | starting | running -> cancelling -> cancelled
    queued -> cancelled
    starting | running -> queued        (lost worker or graceful shutdown: attempt + 1)

Every change is a compare-and-set `UPDATE jobs ... WHERE id = ? AND state IN (...) [AND attempt = ?]`:
of two racing writers exactly one wins, and a stale attempt's late write changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from core.models import Job, utcnow


class JobState(StrEnum):
    QUEUED = "queued"
    STARTING = "starting"
    RUNNING = "running"
    CANCELLING = "cancelling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def is_terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
ACTIVE_STATES = frozenset({JobState.STARTING, JobState.RUNNING, JobState.CANCELLING})

S = JobState
ALLOWED: dict[JobState, frozenset[JobState]] = {
    # queued -> failed: a job that can never run here (e.g. its data vanished before launch).
    S.QUEUED: frozenset({S.STARTING, S.CANCELLING, S.CANCELLED, S.FAILED}),
    # starting -> queued: the worker shut down or was lost before launching; starting -> failed:
    # launch errors. starting -> cancelled: cancel won before the worker claimed the job.
    S.STARTING: frozenset({S.RUNNING, S.QUEUED, S.CANCELLING, S.CANCELLED, S.FAILED}),
    S.RUNNING: frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED, S.CANCELLING, S.QUEUED}),
    # cancelling -> succeeded/failed: the run ended by itself before the cancel took effect.
    S.CANCELLING: frozenset({S.CANCELLED, S.SUCCEEDED, S.FAILED}),
    S.SUCCEEDED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}


class InvalidTransition(ValueError):
    """A transition the table does not allow (a programming error, not a lost race)."""


def sources_of(dst: JobState | str) -> frozenset[JobState]:
    """States from which `dst` may be reached."""
    dst = JobState(dst)
    return frozenset(s for s, targets in ALLOWED.items() if dst in targets)


def transition(
    session: Session,
    job_id: str,
    *,
    to: JobState | str,
    from_states: Iterable[JobState | str] | None = None,
    attempt: int | None = None,
    values: Mapping[str, Any] | None = None,
) -> bool:
    """Move the job to `to` if it is in one of `from_states` (default: every allowed source) and, when
    given, still at `attempt` (filters); also write `values` on the row (an `attempt` there is the new
    attempt). True if this call won, False if it lost.

    Does not commit. Timestamps: `updated_at` always, `started_at` on -> running, `finished_at` on
    -> a terminal state (unless given in `values`).
    """
    dst = JobState(to)
    allowed_sources = sources_of(dst)
    if from_states is None:
        sources = allowed_sources
    else:
        sources = frozenset(JobState(s) for s in from_states)
        bad = sorted(s.value for s in sources - allowed_sources)
        if bad:
            raise InvalidTransition(f"{', '.join(bad)} -> {dst.value} is not an allowed job transition")
    if not sources:
        raise InvalidTransition(f"no state may move to {dst.value}")
    values = dict(values or {})
    unknown = set(values) - set(Job.__table__.columns.keys())
    if unknown or "state" in values or "id" in values:
        raise ValueError(f"cannot set {sorted(unknown | ({'state', 'id'} & set(values)))} in a transition")
    now = utcnow()
    values.setdefault("updated_at", now)
    if dst is JobState.RUNNING:
        values.setdefault("started_at", now)
    if dst.is_terminal():
        values.setdefault("finished_at", now)
    stmt = (
        update(Job)
        .where(Job.id == job_id, Job.state.in_([s.value for s in sources]))
        .values(state=dst.value, **values)
        .execution_options(synchronize_session=False)
    )
    if attempt is not None:
        stmt = stmt.where(Job.attempt == attempt)
    won = session.execute(stmt).rowcount == 1
    if won:
        expire_job(session, job_id)
    return won


def expire_job(session: Session, job_id: str) -> None:
    """Make a Job already loaded in this session re-read its row (after a bulk UPDATE)."""
    for obj in list(session.identity_map.values()):
        if isinstance(obj, Job) and obj.id == job_id:
            session.expire(obj)
