"""The job service: submit, cancel and read jobs. The API and the worker both call it.

Functions take keyword arguments and decide where the transaction commits.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Row, and_, bindparam, inspect, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core import lifecycle
from core.events import Publish
from core.models import Job, JobMetric
from core.settings import get_settings
from core.states import JobState
from trainer.spec import JobSpec


class JobNotFound(LookupError):
    """No job with this id (or not one the caller may see)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id!r} not found")
        self.job_id = job_id


class IdempotencyConflict(ValueError):
    """The Idempotency-Key was used before with a different request body."""

    def __init__(self, key: str, job_id: str) -> None:
        super().__init__(
            f"Idempotency-Key {key!r} was already used for job {job_id} with a different body; "
            "use a new key for a different job"
        )
        self.job_id = job_id


class InvalidCursor(ValueError):
    """A pagination cursor this server did not hand out."""


def spec_hash(spec: JobSpec) -> str:
    """A stable hash of the validated spec: equal specs hash equal however their JSON was written."""
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Submitted:
    job: Job
    created: bool  # False: an Idempotency-Key replay returned the job made earlier


def create_job(
    *,
    session: Session,
    owner: str,
    spec: JobSpec,
    idempotency_key: str | None = None,
    max_attempts: int | None = None,
) -> Submitted:
    """Insert a queued job and commit (the caller then runs the scheduler)."""
    digest = spec_hash(spec)
    if idempotency_key is not None:
        earlier = _by_idempotency_key(session, owner, idempotency_key)
        if earlier is not None:
            return _replay(earlier, idempotency_key, digest)
    job = Job(  # id, attempt 1, no cancel and the times: the columns' defaults
        name=spec.name,
        owner=owner,
        state=JobState.QUEUED.value,
        spec=spec.model_dump(mode="json"),
        gpus=spec.gpus,
        priority=spec.priority,
        max_attempts=max_attempts or get_settings().max_attempts,
        idempotency_key=idempotency_key,
        request_hash=digest,
    )
    session.add(job)
    try:
        session.commit()
    except IntegrityError:
        # A concurrent request with the same key committed first.
        session.rollback()
        if idempotency_key is None:
            raise
        earlier = _by_idempotency_key(session, owner, idempotency_key)
        if earlier is None:
            raise
        return _replay(earlier, idempotency_key, digest)
    return Submitted(job, True)


def find_replay(*, session: Session, owner: str, key: str, spec: JobSpec) -> Job | None:
    """The job an earlier request with this Idempotency-Key made (IdempotencyConflict if its body differed)."""
    earlier = _by_idempotency_key(session, owner, key)
    return None if earlier is None else _replay(earlier, key, spec_hash(spec)).job


def _by_idempotency_key(session: Session, owner: str, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.owner == owner, Job.idempotency_key == key))


def _replay(job: Job, key: str, digest: str) -> Submitted:
    if job.request_hash != digest:
        raise IdempotencyConflict(key, job.id)
    return Submitted(job, False)


def get_job(session: Session, job_id: str) -> Job:
    """The job, or JobNotFound."""
    job = session.get(Job, job_id)
    if job is None:
        raise JobNotFound(job_id)
    return job


# Every mapped column of a job, named as the model names it: a row of these reads like a Job. A list
# leaves out the spec (the largest column; a summary does not show it).
JOB_COLUMNS = tuple(getattr(Job, c.key).label(c.key) for c in inspect(Job).column_attrs)
SUMMARY_COLUMNS = tuple(c for c in JOB_COLUMNS if c.key != "spec")


_JOB_BY_ID = select(*JOB_COLUMNS).where(Job.id == bindparam("job_id"))  # built once: its cache key too


def job_row(conn: Connection, job_id: str) -> Row[Any] | None:
    """The job's columns in one Core SELECT: no ORM identity map or instance (GET /jobs/{id} is the API's
    hottest path; an ORM load was most of its cost)."""
    return conn.execute(_JOB_BY_ID, {"job_id": job_id}).first()


def request_cancel(*, session: Session, job_id: str, publish: Publish | None = None) -> Job:
    """Cancel a job and commit: queued -> cancelled at once; starting/running -> cancelling (the worker
    stops the processes and finishes it); cancelling or terminal: nothing to do (idempotent). The
    change's `state` event goes to `publish` after the commit."""
    get_job(session, job_id)
    event = lifecycle.cancel(session, job_id)
    session.commit()
    if event is not None and publish is not None:
        publish(job_id, event)
    job = get_job(session, job_id)
    session.refresh(job)
    return job


# --- listing --------------------------------------------------------------------------------------


# "<created_at in microseconds since 1970>.<job id>": a position in the newest-first order. Every string
# the pattern matches is a valid position (the OpenAPI document states the pattern), so a cursor is
# either refused by the pattern or answered with a page.
CURSOR_PATTERN = r"^[0-9]{1,17}\.[0-9a-z]{1,32}$"
_CURSOR = re.compile(CURSOR_PATTERN.removeprefix("^").removesuffix("$"))
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def encode_cursor(job: Job | Row[Any]) -> str:
    return f"{(job.created_at - _EPOCH) // timedelta(microseconds=1)}.{job.id}"


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    if not _CURSOR.fullmatch(cursor):
        raise InvalidCursor("cursor is not one this server handed out; start without it")
    micros, job_id = cursor.split(".", 1)
    return _EPOCH + timedelta(microseconds=int(micros)), job_id


def list_jobs(
    session: Session,
    *,
    states: list[JobState] | None = None,
    owner: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> tuple[list[Row[Any]], str | None]:
    """One page of jobs (rows of SUMMARY_COLUMNS: no ORM instances), newest first, and the cursor of the
    next page (None on the last one)."""
    query = select(*SUMMARY_COLUMNS).order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
    if states:
        query = query.where(Job.state.in_([s.value for s in states]))
    if owner is not None:
        query = query.where(Job.owner == owner)
    if cursor:
        created, job_id = decode_cursor(cursor)
        query = query.where(or_(Job.created_at < created, and_(Job.created_at == created, Job.id < job_id)))
    jobs = list(session.connection().execute(query).all())  # Core: no ORM loading of the rows
    if len(jobs) > limit:
        return jobs[:limit], encode_cursor(jobs[limit - 1])
    return jobs, None


def list_metrics(session: Session, job_id: str, *, after_step: int = -1, limit: int = 1000) -> list[JobMetric]:
    """Step history of a job after `after_step`, in step order."""
    query = (
        select(JobMetric)
        .where(JobMetric.job_id == job_id, JobMetric.step > after_step)
        .order_by(JobMetric.step)
        .limit(limit)
    )
    return list(session.scalars(query))


# A stored step as the API shows it: every job_metrics column but the row's own keys.
METRIC_KEYS = tuple(c.name for c in JobMetric.__table__.columns if c.name not in ("id", "job_id"))


def metric_dict(m: JobMetric) -> dict[str, Any]:
    return {key: getattr(m, key) for key in METRIC_KEYS}
