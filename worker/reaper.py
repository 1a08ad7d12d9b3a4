"""Reclaim jobs whose supervisor is gone: a lease not renewed in time sends a running job back to the
queue with attempt + 1 (it resumes from its newest checkpoint) until max_attempts, then `failed`/lost.

Safe to free the GPUs: a dead worker's ranks died with it (fate sharing), and a live supervisor that
cannot renew its lease stops its own run (see runner.Tick) before the grace the reaper waits out.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update

from core import keys
from core.db import session_scope
from core.models import Job, utcnow
from core.scheduler import free_gpus
from core.settings import get_settings
from core.states import JobState, transition
from worker.relay import stream_fields

log = logging.getLogger(__name__)


def reap_expired(redis: Any | None = None) -> list[tuple[str, str]]:
    """End or requeue every job whose lease expired more than the stop grace ago; [(job id, new state)]."""
    settings = get_settings()
    grace = settings.cancel_grace_s + settings.heartbeat_s
    cutoff = utcnow() - timedelta(seconds=grace)
    active = [JobState.RUNNING.value, JobState.CANCELLING.value]
    with session_scope() as session:
        expired = session.execute(
            select(Job.id, Job.attempt, Job.state, Job.max_attempts).where(
                Job.state.in_(active), Job.lease_expires_at.is_not(None), Job.lease_expires_at < cutoff
            )
        ).all()
    out = []
    for job_id, attempt, state, max_attempts in expired:
        to = _reap_one(job_id, attempt, JobState(state), max_attempts)
        if to is None:
            continue
        out.append((job_id, to.value))
        log.warning("job %s attempt %s: lease expired; now %s", job_id, attempt, to.value)
        if redis is not None:
            event = {"type": "state", "state": to.value, "attempt": attempt, "reason": "lease expired",
                     "time": time.time()}  # fmt: skip
            try:
                redis.xadd(keys.job_events(job_id), stream_fields(event), maxlen=settings.stream_maxlen,
                           approximate=True)  # fmt: skip
            except Exception as exc:  # the state is in the DB; the stream is a convenience
                log.warning("could not publish the reaped state of %s: %s", job_id, exc)
    return out


def _reap_one(job_id: str, attempt: int, state: JobState, max_attempts: int) -> JobState | None:
    done: dict[str, Any] = {"lease_owner": None, "lease_expires_at": None}
    with session_scope() as session:
        if state is JobState.CANCELLING:
            to = JobState.CANCELLED
            won = transition(session, job_id, to=to, from_states=[state], attempt=attempt, **done)
        elif attempt < max_attempts:
            to = JobState.QUEUED
            won = transition(session, job_id, to=to, from_states=[state], attempt=attempt, box=None,
                             gpu_ids=None, **done)  # fmt: skip
            if won:
                session.execute(
                    update(Job).where(Job.id == job_id).values(attempt=attempt + 1)
                    .execution_options(synchronize_session=False)
                )  # fmt: skip
        else:
            to = JobState.FAILED
            message = f"its worker was lost on the last attempt ({attempt} of {max_attempts})"
            error = {"type": "lost", "message": message, "log_tail": ""}
            won = transition(session, job_id, to=to, from_states=[state], attempt=attempt, error=error, **done)
        if not won:
            return None
        free_gpus(session, job_id)
    return to
