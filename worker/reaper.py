"""Reclaim jobs whose supervisor is gone: a lease not renewed in time sends a running job back to the
queue with attempt + 1 (it resumes from its newest checkpoint) until max_attempts, then `failed`/lost.

Safe to free the GPUs: a dead worker's ranks died with it (fate sharing), and a live supervisor that
cannot renew its lease stops its own run (see runner.Tick) before the grace the reaper waits out.
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta
from typing import Any

import psutil
from sqlalchemy import select

from core import events as job_events
from core import lifecycle
from core.db import session_scope
from core.models import Job, utcnow
from core.settings import get_settings
from core.states import JobState
from trainer.events import ErrorType

log = logging.getLogger(__name__)

_ACTIVE = [JobState.RUNNING.value, JobState.CANCELLING.value]


def reap_expired(redis: Any | None = None) -> list[tuple[str, str]]:
    """End or requeue every job whose lease expired more than the stop grace ago; [(job id, new state)]."""
    settings = get_settings()
    grace = settings.cancel_grace_s + settings.heartbeat_s
    cutoff = utcnow() - timedelta(seconds=grace)
    with session_scope() as session:
        expired = session.execute(
            select(Job.id, Job.attempt, Job.state, Job.max_attempts).where(
                Job.state.in_(_ACTIVE), Job.lease_expires_at.is_not(None), Job.lease_expires_at < cutoff
            )
        ).all()
    return _reap(expired, "lease expired", redis)


def reap_orphans(box: str, redis: Any | None = None) -> list[tuple[str, str]]:
    """At worker start: reclaim at once the jobs of this box whose lease holder was a worker process on
    this host that is gone (killed, OOM-killed, crashed). Its ranks died with it (fate sharing), so
    there is no need to wait for the lease to expire; a live holder's jobs are left alone."""
    host = socket.gethostname()
    with session_scope() as session:
        held = session.execute(
            select(Job.id, Job.attempt, Job.state, Job.max_attempts, Job.lease_owner).where(
                Job.state.in_(_ACTIVE), Job.box == box, Job.lease_owner.is_not(None)
            )
        ).all()
    orphans = [row[:4] for row in held if _holder_is_gone(row[4], host)]
    return _reap(orphans, "its worker died", redis)


def _holder_is_gone(owner: str, host: str) -> bool:
    """True when `owner` (host:pid:thread, see runner.lease_owner) is a process of this host that no longer runs."""
    holder_host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if holder_host != host or not pid.isdigit() or int(pid) == os.getpid():
        return False
    return not psutil.pid_exists(int(pid))


def _reap(rows: Any, reason: str, redis: Any | None) -> list[tuple[str, str]]:
    publish = job_events.publisher(redis, maxlen=get_settings().stream_maxlen)
    out = []
    for job_id, attempt, state, max_attempts in rows:
        event = _reap_one(job_id, attempt, JobState(state), max_attempts, reason)
        if event is None:
            continue
        out.append((job_id, event["state"]))
        log.warning("job %s attempt %s: %s; now %s", job_id, attempt, reason, event["state"])
        publish(job_id, event)
    return out


def _reap_one(job_id: str, attempt: int, state: JobState, max_attempts: int, reason: str) -> dict[str, Any] | None:
    with session_scope() as session:
        if state is JobState.CANCELLING:
            return lifecycle.cancel(session, job_id, attempt=attempt, stopped=True, reason=reason)
        if attempt < max_attempts:
            return lifecycle.requeue(session, job_id, attempt=attempt, from_states=[state], reason=reason)
        message = f"its worker was lost on the last attempt ({attempt} of {max_attempts})"
        error = {"type": ErrorType.LOST, "message": message, "log_tail": ""}
        return lifecycle.finish(
            session, job_id, attempt=attempt, to=JobState.FAILED, error=error, from_states=[state], reason=reason
        )
