"""Pause and resume through the worker (the /v1 routes' `hold` and `release`): a running job is stopped
by its runner with a checkpoint and requeued, the scheduler passes it over until it is resumed, and the
attempt the stop costs is given back. The real runner and relay on SQLite and Postgres with real Redis
(db 7), the fake trainer standing in for DeepSpeed, as in tests/worker/test_runner.py."""

from __future__ import annotations

import threading

import pytest

from api.openai.jobs import hold, release
from core import lifecycle
from core.db import session_scope
from core.jobs import create_job
from core.scheduler import schedule
from core.settings import get_settings
from tests.helpers import wait_for
from tests.worker.conftest import db, fake, redis  # noqa: F401 (fixtures)
from tests.worker.test_runner import _held, _job, _placed_job, _runs_started, _trainers_left
from trainer.spec import JobSpec
from worker import runner

REDIS_URL = "redis://127.0.0.1:6379/7"


@pytest.fixture
def redis_url() -> str:
    """Redis db 7, not the worker tests' db 12 (the `db` and `redis` fixtures come from tests/worker)."""
    return REDIS_URL


def _schedule() -> list[tuple[str, int, str]]:
    sent: list[tuple[str, int, str]] = []
    with session_scope() as s:
        schedule(s, lambda *a: sent.append(a))
    return sent


def test_a_paused_running_job_checkpoints_waits_and_resumes(db, fake):  # noqa: F811
    fake["argv"] = ["--steps", "100000", "--step-s", "0.05"]
    job_id, attempt = _placed_job()
    attempts = _job(job_id).max_attempts
    result: dict[str, str] = {}
    t = threading.Thread(target=lambda: result.update(state=runner.run_attempt(job_id, attempt)))
    t.start()
    wait_for(lambda: (_job(job_id).step or 0) >= 2, timeout=30, what="steps stored")
    with session_scope() as s:
        assert hold(s, job_id)
        assert not hold(s, job_id), "already paused"
    t.join(30)
    job = _job(job_id)
    assert result["state"] == "queued" and (job.state, job.attempt, job.box) == ("queued", 2, None)
    assert job.paused_at is not None and job.max_attempts == attempts + 1, "the attempt the stop cost is given back"
    assert _held() == [None, None] and _trainers_left(job_id) == []
    assert "checkpoint" in (get_settings().run_dir(job_id) / "events.jsonl").read_text(), "SIGTERM checkpointed"
    assert _schedule() == [], "a paused job is not placed, free slots or not"
    with session_scope() as s:
        assert release(s, job_id)
        assert not release(s, job_id), "not paused any more"
    [(placed, next_attempt, _queue)] = _schedule()
    assert (placed, next_attempt) == (job_id, 2)
    fake["argv"] = ["--steps", "3"]
    assert runner.run_attempt(job_id, next_attempt) == "succeeded"
    assert _runs_started(job_id) == 2 and _job(job_id).state == "succeeded"


def test_a_paused_queued_job_is_passed_over_by_the_scheduler(db):  # noqa: F811
    first, attempt = _placed_job(gpus=2)  # holds both slots
    spec = JobSpec.model_validate(
        {"name": "later", "model": "preset:tiny", "dataset": {"path": "x.jsonl"}, "deepspeed": {"train_batch_size": 2}}
    )
    with session_scope() as s:
        paused = create_job(session=s, owner="u", spec=spec).job.id
        behind = create_job(session=s, owner="u", spec=spec).job.id
        assert hold(s, paused)
    with session_scope() as s:  # the first job ends: both slots come free
        lifecycle.cancel(s, first)
        lifecycle.cancel(s, first, attempt=attempt, stopped=True)
    assert [p[0] for p in _schedule()] == [behind], "the job behind the paused one goes first"
    paused_job = _job(paused)
    assert paused_job.state == "queued" and paused_job.max_attempts == _job(behind).max_attempts, "no attempt added"
    with session_scope() as s:
        assert release(s, paused)
    assert [p[0] for p in _schedule()] == [paused]
