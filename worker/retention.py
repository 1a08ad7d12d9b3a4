"""Retention: the sweep deletes finished jobs' checkpoints N days after they finished, and token cache
entries no job used for N days (TRAINBOX_CHECKPOINT_RETENTION_DAYS; unset: kept). At most once an hour
per worker process: a walk of every finished job's run directory is not for every sweep."""

from __future__ import annotations

import logging
import threading
import time

from core.db import session_scope
from core.disk import human_bytes, prune_checkpoints, prune_token_cache
from core.settings import get_settings

log = logging.getLogger(__name__)

EVERY_S = 3600.0
_lock = threading.Lock()
_last_run: float | None = None  # time.monotonic() of this process's last pass


def maybe_prune(now: float | None = None) -> int | None:
    """Apply the retention setting if it is set and this process has not in the last EVERY_S; returns
    the bytes freed, or None when it did not run."""
    global _last_run
    days = get_settings().checkpoint_retention_days
    if days is None:
        return None
    now = time.monotonic() if now is None else now
    with _lock:
        if _last_run is not None and now - _last_run < EVERY_S:
            return None
        _last_run = now
    return prune(days)


def prune(days: float) -> int:
    """Delete the checkpoints of jobs that finished `days` ago or more; returns the bytes freed."""
    settings = get_settings()
    assert settings.runs_root is not None and settings.data_root is not None
    with session_scope() as session:
        pruned = prune_checkpoints(session, runs_root=settings.runs_root, older_than_days=days)
    freed = sum(p.bytes for p in pruned) + prune_token_cache(settings.data_root, older_than_days=days).bytes
    if pruned:
        log.info(
            "retention (%s days): pruned the checkpoints of %d finished jobs, %s freed",
            days,
            len(pruned),
            human_bytes(freed),
        )
    return freed
