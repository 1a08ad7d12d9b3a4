"""When each queued job should start: the scheduler's order replayed against the running jobs' ETAs.

Each slot is free at some time: now if free, a running job's `eta_s` if known, never if its holder has
no ETA (starting, no rate yet) or the GPU is busy. Queued jobs take, in scheduling order, the earliest
moment some box has enough slots; no job starts before the one ahead of it (the head blocks the
queue). A queued job's own run time is not known, so the slots it takes stay taken: the jobs behind
it that need them get no ETA (None), which is honest rather than optimistic. Per-user GPU caps are
not modelled. Jobs after the first without an ETA are left out (they have none either): the replay
reads the head of the queue only, at most one job per slot plus the ones that fit no box.
"""

from __future__ import annotations

import math
import time

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.models import Box, Gpu, Job, utcnow
from core.progress import progress_of
from core.scheduler import iter_queued
from core.settings import get_settings


def start_etas(session: Session, now: float | None = None) -> dict[str, float | None]:
    """Queued job id -> seconds until it should start (None: not known)."""
    now = time.time() if now is None else now
    cutoff = utcnow().timestamp() - get_settings().box_ttl_s
    boxes = [b.name for b in session.scalars(select(Box)) if b.heartbeat_at.timestamp() >= cutoff]
    holders = {
        j.id: j
        for j in session.scalars(select(Job).where(Job.id.in_(select(Gpu.job_id).where(Gpu.job_id.is_not(None)))))
    }
    free_at: dict[str, list[float]] = {b: [] for b in boxes}
    for gpu in session.scalars(select(Gpu).where(Gpu.box.in_(boxes))):
        if gpu.busy:
            free_at[gpu.box].append(math.inf)
        elif gpu.job_id is None:
            free_at[gpu.box].append(0.0)
        else:
            eta = progress_of(holders[gpu.job_id], now)["eta_s"] if gpu.job_id in holders else None
            free_at[gpu.box].append(math.inf if eta is None else float(eta))
    largest = max((len(s) for s in free_at.values()), default=0)
    out: dict[str, float | None] = {}
    if largest == 0:
        return out  # no live box: nothing is placed, no job has an ETA
    not_before = 0.0
    for job in iter_queued(session):
        if job.gpus > largest:
            out[job.id] = None  # fits no box: skipped by the scheduler, does not hold the others up
            continue
        best: tuple[float, str] | None = None
        for box, slots in free_at.items():
            if len(slots) >= job.gpus:
                t = sorted(slots)[job.gpus - 1]
                best = min(best or (t, box), (t, box))
        start = max(not_before, best[0]) if best else math.inf
        out[job.id] = None if math.isinf(start) else round(start, 1)
        if math.isinf(start):
            break  # every job behind starts no earlier: none has an ETA (at most one per slot does)
        not_before = start
        if best and not math.isinf(start):
            slots = sorted(free_at[best[1]])
            free_at[best[1]] = [math.inf] * job.gpus + slots[job.gpus :]  # its run time is unknown
    return out
