"""Per-user limits on what a job may ask for, on the queue, and on how fast one submits.

Each refusal names the limit and where it is set: the TRAINBOX_ setting, or a per-user override an
admin sets with `trainbox-admin users set NAME --<limit> N`.
"""

from __future__ import annotations

import logging
import math
import time

from redis import Redis
from redis.exceptions import RedisError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.errors import LimitExceeded, TooManyRequests
from core import keys
from core.disk import disk_usage, human_bytes
from core.models import Dataset, Job
from core.states import JobState
from core.users import Principal, setting_name
from trainer.spec import JobSpec

log = logging.getLogger(__name__)

RATE_WINDOW_S = 60


def _where(limit: str) -> str:
    """Where a limit is set: its setting (`<limit>_per_user` where there is one), or an admin's override."""
    by_admin = f"trainbox-admin users set NAME --{limit.replace('_', '-')} N"
    return f"(limit {limit}: TRAINBOX_{setting_name(limit).upper()}, or per user by an admin: {by_admin})"


def check_spec_limits(spec: JobSpec, user: Principal) -> None:
    """403 if the spec asks for more than the user may have: GPUs, runtime, priority."""
    lim = user.limits
    if lim.max_gpus is not None and spec.gpus > lim.max_gpus:
        raise LimitExceeded(
            f"gpus {spec.gpus} is more than your {lim.max_gpus} GPUs in use at once {_where('max_gpus')}",
            ["body", "gpus"],
        )
    if spec.max_runtime_s is None or spec.max_runtime_s > lim.max_runtime_s:
        asked = "no max_runtime_s" if spec.max_runtime_s is None else f"max_runtime_s {spec.max_runtime_s}"
        raise LimitExceeded(
            f"{asked} is over your cap of {lim.max_runtime_s} s per job {_where('max_runtime_s')}",
            ["body", "max_runtime_s"],
        )
    if lim.max_priority is not None and spec.priority > lim.max_priority:
        raise LimitExceeded(
            f"priority {spec.priority} is above your ceiling of {lim.max_priority} {_where('max_priority')}",
            ["body", "priority"],
        )


def check_queue_limit(session: Session, user: Principal) -> None:
    """403 if the user already has as many jobs waiting as they may."""
    queued = session.scalar(
        select(func.count()).select_from(Job).where(Job.owner == user.name, Job.state == JobState.QUEUED.value)
    )
    if (queued or 0) >= user.limits.max_queued:
        raise LimitExceeded(
            f"you have {queued} jobs queued, the most you may have waiting {_where('max_queued')}; "
            "wait for some to start or cancel some",
            ["body"],
        )


def check_submit_rate(redis: Redis | None, user: Principal) -> None:
    """429 with Retry-After once the user has submitted `submit_rate_per_minute` times this minute.

    A fixed one-minute window counted in Redis, so every API process shares it. Without Redis (or
    when it does not answer) submissions are not rate-limited: the queue limit still holds.
    """
    if redis is None:
        return
    now = time.time()
    window = int(now // RATE_WINDOW_S)
    key = keys.submit_rate(user.name, window)
    try:
        with redis.pipeline() as pipe:
            pipe.incr(key)
            pipe.expire(key, RATE_WINDOW_S + 5)
            count = int(pipe.execute()[0])
    except RedisError as e:
        log.warning("submit rate limit not checked (Redis): %s", e)
        return
    limit = user.limits.submit_rate_per_minute
    if count > limit:
        retry = max(1, math.ceil((window + 1) * RATE_WINDOW_S - now))
        raise TooManyRequests(
            f"too many submissions: {limit} per minute {_where('submit_rate_per_minute')}; retry in {retry} s",
            [],
            headers={"Retry-After": str(retry)},
        )


def check_upload_quota(session: Session, user: Principal, *, adding: int = 0) -> int:
    """403 if one more upload (of `adding` bytes, when known) would take the user past their count or
    byte quota; else the bytes they may still upload."""
    lim = user.limits
    count, used = session.execute(
        select(func.count(), func.coalesce(func.sum(Dataset.bytes), 0)).where(Dataset.owner == user.name)
    ).one()
    if count >= lim.max_datasets:
        raise LimitExceeded(
            f"you have {count} uploaded datasets, the most you may keep {_where('max_datasets')}; "
            "delete one first (trainbox datasets delete ID)",
            ["body", "file"],
        )
    if used + max(adding, 1) > lim.max_dataset_bytes:
        raise upload_bytes_exceeded(user, int(used))
    return lim.max_dataset_bytes - int(used)


def upload_bytes_exceeded(user: Principal, used: int) -> LimitExceeded:
    """The 403 for an upload that would take the user's uploads over their byte quota."""
    return LimitExceeded(
        f"this upload would take your uploads past {user.limits.max_dataset_bytes} bytes ({used} in use) "
        f"{_where('max_dataset_bytes')}; delete some first (trainbox datasets delete ID)",
        ["body", "file"],
    )


def token_limit_exceeded(user: Principal, live: int) -> LimitExceeded:
    """The 403 for a new token over the user's cap on live tokens."""
    return LimitExceeded(
        f"you have {live} live tokens, the most you may hold {_where('max_tokens')}; revoke one first",
        ["body"],
    )


def check_disk_quota(session: Session, user: Principal) -> None:
    """403 if the user's run directories and uploads already take their disk quota (or more)."""
    cap = user.limits.max_disk_bytes
    if cap is None:
        return
    use = disk_usage(session, user.name)
    if use.total_bytes >= cap:
        raise LimitExceeded(
            f"you use {human_bytes(use.total_bytes)} ({use.total_bytes} bytes) of disk: "
            f"{use.jobs_bytes} bytes in your jobs' run directories and {use.uploads_bytes} in uploads, at or over "
            f"your quota of {human_bytes(cap)} ({cap} bytes) {_where('max_disk_bytes')}; free some first: "
            "delete uploads (trainbox datasets delete ID), or ask an admin to delete finished jobs' "
            "checkpoints (trainbox prune)",
            ["body"],
        )
