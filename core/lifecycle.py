"""Every job state change with side effects, one function each; nothing else writes `jobs.state`.

    place    queued -> starting            the scheduler, on GPUs it took in the same transaction
    start    starting -> running           the worker's claim, with the lease
    requeue  starting | running -> queued  GPUs freed, lease cleared; attempt + 1 (lost or preempted
                                           run) or the same attempt (nothing ran: busy GPUs)
    finish   -> succeeded | failed | cancelled   error recorded, lease cleared, GPUs freed
    cancel   queued -> cancelled at once; starting | running -> cancelling; cancelling -> cancelled
             once the processes are gone (`stopped=True`: GPUs freed)

Each one is a compare-and-set (core.states.transition) and returns the `state` event to publish, or
None when it lost (the job moved on; nothing was written). None commits: the caller's unit of work does.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from core import scheduler
from core.events import Publish
from core.models import utcnow
from core.states import JobState, transition

if TYPE_CHECKING:
    from core.scheduler import Dispatch

Event = dict[str, Any]
S = JobState

_LEASE_CLEARED = {"lease_owner": None, "lease_expires_at": None}


def state_event(state: JobState | str, *, attempt: int | None = None, **extra: Any) -> Event:
    """The stream's `state` event (the publisher adds the time)."""
    event: Event = {"type": "state", "state": JobState(state).value}
    if attempt is not None:
        event["attempt"] = attempt
    return {**event, **extra}


def announcing(dispatch: Dispatch | None, publish: Publish) -> Dispatch | None:
    """`dispatch` for schedule() that first publishes the placement's `starting` event (None stays None)."""
    if dispatch is None:
        return None
    send = dispatch

    def announce_and_dispatch(job_id: str, attempt: int, queue: str) -> None:
        publish(job_id, state_event(S.STARTING, attempt=attempt))
        send(job_id, attempt, queue)

    return announce_and_dispatch


def place(
    session: Session, job_id: str, *, attempt: int, box: str, gpu_ids: list[int], **placement: Any
) -> Event | None:
    """queued -> starting on `gpu_ids` of `box` (the caller took the GPU rows); a stale cancel flag is cleared."""
    values = {"box": box, "gpu_ids": gpu_ids, "cancel_requested": False, **placement}
    if not transition(session, job_id, to=S.STARTING, from_states=[S.QUEUED], attempt=attempt, values=values):
        return None
    return state_event(S.STARTING, attempt=attempt)


def start(session: Session, job_id: str, *, attempt: int, lease_owner: str, lease_s: float) -> Event | None:
    """starting -> running for this attempt, holding the lease; None: a duplicate delivery, a stale
    attempt or a cancel."""
    values = {"lease_owner": lease_owner, "lease_expires_at": utcnow() + timedelta(seconds=lease_s)}
    if not transition(session, job_id, to=S.RUNNING, from_states=[S.STARTING], attempt=attempt, values=values):
        return None
    return state_event(S.RUNNING, attempt=attempt)


def requeue(
    session: Session,
    job_id: str,
    *,
    attempt: int,
    from_states: Iterable[JobState] = (S.STARTING, S.RUNNING),
    next_attempt: bool = True,
    **extra: Any,
) -> Event | None:
    """Back to `queued`: GPUs freed, lease cleared, attempt + 1 (the next attempt resumes from the newest
    checkpoint) or, with `next_attempt=False`, the same attempt (nothing ran). `extra` goes on the event."""
    values: dict[str, Any] = {"box": None, "gpu_ids": None, **_LEASE_CLEARED}
    if next_attempt:
        values["attempt"] = attempt + 1
    if not transition(session, job_id, to=S.QUEUED, from_states=from_states, attempt=attempt, values=values):
        return None
    scheduler.free_gpus(session, job_id)
    return state_event(S.QUEUED, attempt=attempt, **extra)


def finish(
    session: Session,
    job_id: str,
    *,
    attempt: int,
    to: JobState,
    error: dict[str, Any] | None = None,
    from_states: Iterable[JobState] = (S.RUNNING, S.CANCELLING),
    **extra: Any,
) -> Event | None:
    """The attempt's end (call only once its processes are gone): terminal state, error, lease cleared,
    GPUs freed. The event carries the error and `extra`."""
    to = JobState(to)
    if not to.is_terminal():
        raise ValueError(f"finish: {to.value} is not a terminal state")
    values: dict[str, Any] = dict(_LEASE_CLEARED)
    if error is not None:
        values["error"] = error
    if not transition(session, job_id, to=to, from_states=from_states, attempt=attempt, values=values):
        return None
    scheduler.free_gpus(session, job_id)
    return state_event(to, attempt=attempt, **({"error": error} if error else {}), **extra)


def cancel(
    session: Session, job_id: str, *, attempt: int | None = None, stopped: bool = False, **extra: Any
) -> Event | None:
    """A cancel: queued -> cancelled at once (it holds nothing); starting | running -> cancelling (its
    worker stops the processes); with `stopped=True` (the processes are gone, or never started):
    cancelling -> cancelled, GPUs freed. None: nothing changed (already cancelling, terminal, or moved)."""
    if stopped:
        if attempt is None:
            raise ValueError("cancel(stopped=True) ends one attempt: give it")
        return finish(session, job_id, attempt=attempt, to=S.CANCELLED, from_states=[S.CANCELLING], **extra)
    flag = {"cancel_requested": True}
    if transition(session, job_id, to=S.CANCELLED, from_states=[S.QUEUED], attempt=attempt, values=flag):
        return state_event(S.CANCELLED, attempt=attempt, **extra)
    if transition(session, job_id, to=S.CANCELLING, from_states=[S.STARTING, S.RUNNING], attempt=attempt, values=flag):
        return state_event(S.CANCELLING, attempt=attempt, **extra)
    return None
