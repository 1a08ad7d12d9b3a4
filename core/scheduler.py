"""The scheduler: gives queued jobs whole GPUs on one box, one serialized transaction at a time.

Order is (priority desc, created asc). A job that does not fit now blocks every job behind it, so
small jobs never starve a big one at the head (a job bigger than any box is skipped: it could
otherwise block the queue forever). Placement is best-fit: the box with the fewest free GPUs that
still holds the job, lowest GPU indices first, keeping large holes for large jobs.

Concurrent callers (API processes, workers, the sweep) serialize on a DB lock: a Postgres advisory
transaction lock, or SQLite's BEGIN IMMEDIATE. The GPU claim is also guarded row by row
(`... WHERE job_id IS NULL`), so a GPU is never in two jobs even if the lock were bypassed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select, text, update
from sqlalchemy.orm import Session

from core import keys, lifecycle
from core.db import SQLITE_BEGIN, is_postgres
from core.models import Box, Gpu, Job, User, utcnow
from core.settings import get_settings
from core.states import ACTIVE_STATES, JobState

log = logging.getLogger(__name__)

# pg_advisory_xact_lock key: "trainbox" scheduler.
SCHEDULER_LOCK_KEY = 0x7472_6169_6E62

Dispatch = Callable[[str, int, str], None]  # (job_id, attempt, box queue)


class _Unset:
    pass


_UNSET = _Unset()


@dataclass(frozen=True)
class Placement:
    job_id: str
    attempt: int
    box: str
    queue: str
    gpu_ids: list[int]


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    memory_mb: int | None = None


def begin_locked(session: Session) -> None:
    """Start the session's transaction holding the scheduler lock (commits what the session held)."""
    if session.in_transaction():
        session.commit()
    if is_postgres(session):
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": SCHEDULER_LOCK_KEY})
    else:
        session.connection(execution_options={SQLITE_BEGIN: "IMMEDIATE"})


def schedule(
    session: Session,
    dispatch: Dispatch | None,
    *,
    box_ttl_s: float | None = None,
    max_gpus_per_user: int | None | _Unset = _UNSET,
) -> list[Placement]:
    """Place what fits, commit, then call dispatch(job_id, attempt, queue) for each placement.

    Commits whatever the session held first. `box_ttl_s`: ignore boxes whose heartbeat is older.
    `max_gpus_per_user` (default: the setting; users.max_gpus overrides it per user): a job whose
    owner would hold more GPUs at once waits, without blocking other users' jobs behind it.
    A failing dispatch is logged; the job stays `starting` and the sweep re-sends it.
    """
    if isinstance(max_gpus_per_user, _Unset):
        max_gpus_per_user = get_settings().max_gpus_per_user
    begin_locked(session)
    try:
        placements = _place(session, box_ttl_s=box_ttl_s, max_gpus_per_user=max_gpus_per_user)
        from core.queue import refresh  # core.queue reads the order from this module

        refresh(session, placed=bool(placements))  # stored positions and start ETAs: reads never walk the queue
        session.commit()
    except BaseException:
        session.rollback()
        raise
    for p in placements:
        if dispatch is None:
            continue
        try:
            dispatch(p.job_id, p.attempt, p.queue)
        except Exception:
            log.exception(
                "dispatch of job %s attempt %s to %s failed; the sweep will re-send",
                p.job_id,
                p.attempt,
                p.queue,
            )
    return placements


def _gpu_budget(session: Session, default: int | None) -> tuple[dict[str, int], dict[str, int | None]]:
    """GPUs each owner's active jobs hold, and each owner's cap (a per-user override, else `default`)."""
    active = [s.value for s in ACTIVE_STATES]
    held = dict(
        session.execute(select(Job.owner, func.sum(Job.gpus)).where(Job.state.in_(active)).group_by(Job.owner)).all()
    )
    caps: dict[str, int | None] = {name: cap for name, cap in session.execute(select(User.name, User.max_gpus))}
    return {k: int(v or 0) for k, v in held.items()}, {k: default if v is None else v for k, v in caps.items()}


def _place(session: Session, *, box_ttl_s: float | None, max_gpus_per_user: int | None) -> list[Placement]:
    boxes_q = select(Box).order_by(Box.name)
    if box_ttl_s is not None:
        boxes_q = boxes_q.where(Box.heartbeat_at >= utcnow() - timedelta(seconds=box_ttl_s))
    boxes = {b.name: b for b in session.scalars(boxes_q)}
    if not boxes:
        return []
    free: dict[str, list[int]] = {name: [] for name in boxes}
    size: dict[str, int] = dict.fromkeys(boxes, 0)
    for gpu in session.scalars(select(Gpu).where(Gpu.box.in_(boxes)).order_by(Gpu.box, Gpu.index)):
        size[gpu.box] += 1
        if gpu.job_id is None and not gpu.busy:  # busy: used outside trainbox (worker.gpucheck)
            free[gpu.box].append(gpu.index)
    largest = max(size.values())
    if not any(free.values()):
        return []  # every GPU is held: nothing can be placed, whatever waits

    held, caps = _gpu_budget(session, max_gpus_per_user)
    placements: list[Placement] = []
    for job in iter_queued(session):
        if job.gpus > largest:
            continue  # can never run on the boxes there are; do not block the queue behind it
        cap = caps.get(job.owner, max_gpus_per_user)
        if cap is not None and held.get(job.owner, 0) + job.gpus > cap:
            continue  # its owner is at their GPU cap: it waits, other users' jobs go ahead
        fitting = [name for name in boxes if len(free[name]) >= job.gpus]
        if not fitting:
            break  # the head waits for GPUs; everything behind it waits too
        box = min(fitting, key=lambda name: (len(free[name]), name))
        gpu_ids = free[box][: job.gpus]
        if not _claim(session, job, box, gpu_ids):
            continue
        free[box] = free[box][job.gpus :]
        held[job.owner] = held.get(job.owner, 0) + job.gpus
        placements.append(Placement(job.id, job.attempt, box, boxes[box].queue, gpu_ids))
    return placements


def _claim(session: Session, job: Job, box: str, gpu_ids: list[int]) -> bool:
    """Take the GPUs and move the job to `starting`, or change nothing (savepoint)."""
    with session.begin_nested() as nested:
        taken = session.execute(
            update(Gpu)
            .where(Gpu.box == box, Gpu.index.in_(gpu_ids), Gpu.job_id.is_(None), Gpu.busy.is_(False))
            .values(job_id=job.id)
            .execution_options(synchronize_session=False)
        ).rowcount
        if taken != len(gpu_ids) or not lifecycle.place(session, job.id, attempt=job.attempt, box=box, gpu_ids=gpu_ids):
            nested.rollback()
            log.info("job %s changed while being placed; skipped", job.id)
            return False
    return True


def queued_order(query: Any) -> Any:
    """Restrict a Job select to queued jobs in scheduling order."""
    return query.where(Job.state == JobState.QUEUED.value).order_by(
        Job.priority.desc(), Job.created_at.asc(), Job.id.asc()
    )


def iter_queued(session: Session, *, first_page: int = 4, max_page: int = 256) -> Iterator[Job]:
    """Queued jobs not being cancelled nor paused, in scheduling order, read a page at a time (keyset; pages
    double from `first_page`): a pass that stops at a head that does not fit reads a few rows, however long
    the queue."""
    after: tuple[int, Any, str] | None = None
    page = first_page
    while True:
        query = queued_order(select(Job).where(Job.cancel_requested.is_(False), Job.paused_at.is_(None))).limit(page)
        if after is not None:
            priority, created, job_id = after
            query = query.where(
                or_(
                    Job.priority < priority,
                    and_(
                        Job.priority == priority,
                        or_(Job.created_at > created, and_(Job.created_at == created, Job.id > job_id)),
                    ),
                )
            )
        rows = session.scalars(query).all()
        yield from rows
        if len(rows) < page:
            return
        after = (rows[-1].priority, rows[-1].created_at, rows[-1].id)
        page = min(2 * page, max_page)


def free_gpus(session: Session, job_id: str) -> int:
    """Release the job's GPUs (call only once its processes are gone). Does not commit."""
    return session.execute(
        update(Gpu).where(Gpu.job_id == job_id).values(job_id=None).execution_options(synchronize_session=False)
    ).rowcount


def register_box(session: Session, name: str, gpus: Sequence[GpuInfo | dict[str, Any]]) -> Box:
    """Create or refresh a box and its GPUs (a worker calls this at start). Does not commit.

    GPUs that vanished are removed unless a job holds them; allocations of the others are kept.
    """
    infos = [g if isinstance(g, GpuInfo) else GpuInfo(**g) for g in gpus]
    box = session.get(Box, name)
    if box is None:
        box = Box(name=name, queue=keys.box_queue(name))
        session.add(box)
    box.heartbeat_at = utcnow()
    session.flush()
    existing = {g.index: g for g in session.scalars(select(Gpu).where(Gpu.box == name))}
    for info in infos:
        gpu = existing.pop(info.index, None)
        if gpu is None:
            session.add(Gpu(box=name, index=info.index, name=info.name, memory_mb=info.memory_mb))
        else:
            gpu.name, gpu.memory_mb = info.name, info.memory_mb
    for gpu in existing.values():
        if gpu.job_id is None:
            session.delete(gpu)
    session.flush()
    return box


def heartbeat_box(session: Session, name: str) -> bool:
    """Mark the box alive now. Does not commit."""
    return (
        session.execute(
            update(Box)
            .where(Box.name == name)
            .values(heartbeat_at=utcnow())
            .execution_options(synchronize_session=False)
        ).rowcount
        == 1
    )


def queue_position_for(session: Session, *, priority: int) -> int:
    """The position a job submitted now with this priority would get."""
    ahead = session.scalar(
        select(func.count()).select_from(Job).where(Job.state == JobState.QUEUED.value, Job.priority >= priority)
    )
    return int(ahead or 0) + 1


def report_gpu_memory(session: Session, box: str, used_mb: Mapping[int, int | None]) -> None:
    """Store each GPU's memory in use (from NVML) for GET /gpus. Does not commit."""
    for index, used in used_mb.items():
        session.execute(
            update(Gpu)
            .where(Gpu.box == box, Gpu.index == index)
            .values(memory_used_mb=used)
            .execution_options(synchronize_session=False)
        )
