"""Disk on a shared box: what run directories and uploads take, per job and per user, and pruning the
checkpoints of finished jobs (the retention setting in the worker's sweep; POST /admin/prune).

A job's size is measured by the worker (after each checkpoint, at the end of an attempt, after a
prune) and stored in `jobs.disk_bytes`: reading a job never walks the file system. Pruning keeps
what a finished job is for: the final model (`model/`), `events.jsonl` and `train.log`.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from core.models import Dataset, Job, utcnow
from core.states import JobState
from trainer import tokencache
from trainer.events import CHECKPOINTS_DIR
from trainer.units import human_bytes

log = logging.getLogger(__name__)

TERMINAL = [s.value for s in JobState if s.is_terminal()]


def tree_bytes(path: Path) -> int:
    """Bytes of the regular files under path (0 if it is absent). Symlinks are neither followed nor
    counted; what vanishes during the walk (a checkpoint pruned by the trainer) is skipped."""
    total, stack = 0, [path]
    while stack:
        try:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(Path(entry.path))
                        elif entry.is_file(follow_symlinks=False):
                            total += entry.stat(follow_symlinks=False).st_size
                    except FileNotFoundError:
                        continue
        except (FileNotFoundError, NotADirectoryError):
            continue
    return total


def record_disk_bytes(session: Session, job_id: str, run_dir: Path) -> int:
    """Measure the job's run directory and store it in jobs.disk_bytes; returns it. Does not commit."""
    size = tree_bytes(run_dir)
    session.execute(
        update(Job).where(Job.id == job_id).values(disk_bytes=size).execution_options(synchronize_session=False)
    )
    return size


@dataclass(frozen=True)
class DiskUsage:
    """One user's disk: their jobs' run directories (as last measured) and their uploads."""

    jobs_bytes: int = 0
    uploads_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.jobs_bytes + self.uploads_bytes


def disk_usage(session: Session, owner: str) -> DiskUsage:
    """The user's disk use, from the database (jobs.disk_bytes and datasets.bytes)."""
    jobs = session.scalar(select(func.coalesce(func.sum(Job.disk_bytes), 0)).where(Job.owner == owner))
    uploads = session.scalar(select(func.coalesce(func.sum(Dataset.bytes), 0)).where(Dataset.owner == owner))
    return DiskUsage(int(jobs or 0), int(uploads or 0))


def disk_usage_by_owner(session: Session) -> dict[str, DiskUsage]:
    """Every user's disk use (two grouped queries)."""
    jobs = dict(session.execute(select(Job.owner, func.sum(Job.disk_bytes)).group_by(Job.owner)).tuples().all())
    uploads = dict(
        session.execute(select(Dataset.owner, func.sum(Dataset.bytes)).group_by(Dataset.owner)).tuples().all()
    )
    return {o: DiskUsage(int(jobs.get(o) or 0), int(uploads.get(o) or 0)) for o in jobs.keys() | uploads.keys()}


@dataclass
class PrunedJob:
    """A finished job whose checkpoints were (or, in a dry run, would be) deleted."""

    id: str
    owner: str
    finished_at: datetime | None
    checkpoints: list[str] = field(default_factory=list)  # run-dir relative names: checkpoints/step-N
    bytes: int = 0


def prune_checkpoints(
    session: Session,
    *,
    runs_root: Path,
    older_than_days: float,
    dry_run: bool = False,
    now: datetime | None = None,
) -> list[PrunedJob]:
    """Delete the checkpoints of jobs in a terminal state that finished at least `older_than_days` ago.

    Only `<run dir>/checkpoints` goes (DeepSpeed's shards, partial saves, its helper scripts); the
    final model, the events and the log stay. A terminal job never runs again, so nothing is writing
    there. Each job's disk_bytes is measured again and committed job by job; a dry run changes nothing.
    """
    cutoff = (now or utcnow()) - timedelta(days=older_than_days)
    rows = session.execute(
        select(Job.id, Job.owner, Job.finished_at)
        .where(Job.state.in_(TERMINAL), Job.finished_at <= cutoff)
        .order_by(Job.finished_at, Job.id)
    ).all()
    session.rollback()  # end the read: on SQLite a long walk must not sit inside a transaction
    pruned = []
    for job_id, owner, finished_at in rows:
        run_dir = runs_root / job_id
        ckpts = run_dir / CHECKPOINTS_DIR
        if not ckpts.is_dir() or ckpts.is_symlink():
            continue
        names = sorted(f"{CHECKPOINTS_DIR}/{p.name}" for p in ckpts.iterdir() if p.name.startswith(("step-", ".tmp-")))
        size = tree_bytes(ckpts)
        if not names and not size:
            continue
        pruned.append(PrunedJob(job_id, owner, finished_at, names, size))
        if dry_run:
            continue
        shutil.rmtree(ckpts, ignore_errors=True)
        record_disk_bytes(session, job_id, run_dir)
        session.commit()
        log.info("pruned the checkpoints of job %s (%s, %s)", job_id, ", ".join(names), human_bytes(size))
    return pruned


@dataclass
class PrunedCache:
    """Tokenized-data cache entries (shared by jobs on the same data) deleted for not being used."""

    entries: int = 0
    bytes: int = 0


def prune_token_cache(data_root: Path, *, older_than_days: float, dry_run: bool = False) -> PrunedCache:
    """Delete the token cache's entries that no job used for `older_than_days` (a job on that data
    tokenizes it again); a dry run deletes nothing."""
    cache_dir = data_root / tokencache.TOKEN_CACHE_DIR
    old = tokencache.prune_unused(cache_dir, older_than_days * 86400, dry_run=dry_run)
    freed = PrunedCache(len(old), sum(e.bytes for e in old))
    if old and not dry_run:
        log.info(
            "pruned %d token cache entries unused for %g days (%s)",
            freed.entries,
            older_than_days,
            human_bytes(freed.bytes),
        )
    return freed
