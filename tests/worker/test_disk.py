"""Disk, on the worker's side (SQLite and Postgres, real Redis, the fake trainer): a job's disk_bytes
is measured after each checkpoint event and at the end of the attempt; the sweep applies the
checkpoint retention, at most once an hour per process."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import pytest

from core.db import session_scope
from core.disk import tree_bytes
from core.models import Job, utcnow
from core.settings import get_settings
from tests.core.factories import add_job
from tests.helpers import wait_for
from tests.worker.conftest import BOX
from tests.worker.test_runner import _job, _placed_job
from worker import box as box_mod
from worker import celery_app, retention, runner


def test_disk_bytes_follow_each_checkpoint_and_the_end_of_the_attempt(db, fake):
    fake["argv"] = ["--steps", "6", "--step-s", "0.3", "--checkpoint-every", "2", "--checkpoint-bytes", "50000"]
    job_id, attempt = _placed_job()
    assert _job(job_id).disk_bytes is None  # never measured: not 0
    done: list[str] = []
    t = threading.Thread(target=lambda: done.append(runner.run_attempt(job_id, attempt)))
    t.start()
    try:
        # While it runs: the first checkpoint's size, from its event (not from the end of the attempt).
        first = wait_for(lambda: (b := _job(job_id).disk_bytes) and b >= 50000 and b, timeout=30, what="step-2 sized")
        assert _job(job_id).state == "running" and first < 100000
    finally:
        t.join(60)
    assert done == ["succeeded"]
    run_dir = get_settings().run_dir(job_id)
    job = _job(job_id)
    assert job.disk_bytes == tree_bytes(run_dir) and job.disk_bytes >= 3 * 50000


def _run_dir_with(job_id: str, *, checkpoints: int = 2, size: int = 4000) -> Path:
    run_dir = get_settings().run_dir(job_id)
    for i in range(1, checkpoints + 1):
        (run_dir / "checkpoints" / f"step-{i * 10}").mkdir(parents=True)
        (run_dir / "checkpoints" / f"step-{i * 10}" / "shard.pt").write_bytes(b"c" * size)
    (run_dir / "model").mkdir(parents=True, exist_ok=True)
    (run_dir / "model" / "model.safetensors").write_bytes(b"m" * 1000)
    (run_dir / "events.jsonl").write_text('{"type": "end"}\n')
    (run_dir / "train.log").write_text("done\n")
    return run_dir


@pytest.fixture
def retention_days(monkeypatch):
    monkeypatch.setenv("TRAINBOX_CHECKPOINT_RETENTION_DAYS", "7")
    get_settings.cache_clear()
    monkeypatch.setattr(retention, "_last_run", None)
    monkeypatch.setattr(celery_app, "dispatch", lambda *a: None)
    yield 7
    get_settings.cache_clear()


def test_the_sweep_prunes_old_finished_jobs_checkpoints_hourly_and_keeps_the_rest(db, retention_days):
    old = utcnow() - timedelta(days=8)
    with session_scope() as s:
        done_old = add_job(s, state="succeeded", finished_at=old, disk_bytes=9000).id
        failed_old = add_job(s, state="failed", finished_at=old).id
        done_new = add_job(s, state="succeeded", finished_at=utcnow() - timedelta(days=6)).id
        running = add_job(s, state="running", started_at=old).id  # started long ago, still training
    dirs = {j: _run_dir_with(j) for j in (done_old, failed_old, done_new, running)}

    box_mod.sweep(BOX)

    for j in (done_old, failed_old):
        assert not (dirs[j] / "checkpoints").exists()
        assert (dirs[j] / "model" / "model.safetensors").stat().st_size == 1000
        assert (dirs[j] / "events.jsonl").exists() and (dirs[j] / "train.log").exists()
        assert _job(j).disk_bytes == tree_bytes(dirs[j]) == 1000 + 16 + 5  # measured again after the prune
    for j in (done_new, running):
        assert sorted(p.name for p in (dirs[j] / "checkpoints").iterdir()) == ["step-10", "step-20"]
    assert _job(running).state == "running"

    # Once an hour per process: the next sweeps leave a new old job alone until the hour has passed.
    with session_scope() as s:
        later = add_job(s, state="cancelled", finished_at=old).id
    _run_dir_with(later)
    box_mod.sweep(BOX)
    assert (dirs[done_old].parent / later / "checkpoints").is_dir()
    assert retention.maybe_prune(now=retention._last_run + retention.EVERY_S + 1) == 2 * 4000
    assert not (dirs[done_old].parent / later / "checkpoints").exists()


def test_no_retention_setting_keeps_everything(db, monkeypatch):
    monkeypatch.setattr(retention, "_last_run", None)
    with session_scope() as s:
        job = add_job(s, state="succeeded", finished_at=utcnow() - timedelta(days=3650))
        job_id = job.id
    run_dir = _run_dir_with(job_id)
    assert get_settings().checkpoint_retention_days is None
    assert retention.maybe_prune() is None
    assert (run_dir / "checkpoints" / "step-10").is_dir()
    with session_scope() as s:
        assert s.get_one(Job, job_id).state == "succeeded"
