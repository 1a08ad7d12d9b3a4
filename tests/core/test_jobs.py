"""The job service: create (idempotency, also under a race), cancel, list with cursor ties, progress."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import pytest

from core import jobs
from core.models import Job
from core.progress import progress_of
from core.states import JobState
from tests.core.factories import add_job
from trainer.spec import JobSpec

SPEC = JobSpec(name="t", model="preset:tiny", dataset={"path": "d.jsonl"}, max_steps=5)


def test_create_job_defaults(session):
    sub = jobs.create_job(session=session, owner="ann", spec=SPEC, max_attempts=5)
    assert sub.created
    job = session.get(Job, sub.job.id)
    assert (job.state, job.attempt, job.max_attempts, job.gpus, job.priority) == ("queued", 1, 5, 1, 0)
    assert JobSpec.model_validate(job.spec) == SPEC  # the stored spec is complete and re-validates


def test_idempotency_same_and_different_body(session):
    a = jobs.create_job(session=session, owner="ann", spec=SPEC, idempotency_key="k")
    b = jobs.create_job(session=session, owner="ann", spec=SPEC, idempotency_key="k")
    assert (b.created, b.job.id) == (False, a.job.id)
    with pytest.raises(jobs.IdempotencyConflict):
        jobs.create_job(session=session, owner="ann", spec=SPEC.model_copy(update={"seed": 1}), idempotency_key="k")


def test_idempotency_race_makes_one_job(sessions):
    results: list[str] = []
    barrier = threading.Barrier(6)

    def submit():
        with sessions() as s:
            barrier.wait()
            results.append(jobs.create_job(session=s, owner="ann", spec=SPEC, idempotency_key="race").job.id)

    threads = [threading.Thread(target=submit) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 6 and len(set(results)) == 1


def test_request_cancel_by_state(session):
    queued, running, starting, done = (
        add_job(session),
        add_job(session, state="running"),
        add_job(session, state="starting"),
        add_job(session, state="failed"),
    )
    assert jobs.request_cancel(session=session, job_id=queued.id).state == "cancelled"
    assert jobs.request_cancel(session=session, job_id=running.id).state == "cancelling"
    assert jobs.request_cancel(session=session, job_id=starting.id).state == "cancelling"
    assert jobs.request_cancel(session=session, job_id=done.id).state == "failed"
    assert jobs.request_cancel(session=session, job_id=running.id).state == "cancelling"
    assert session.get(Job, running.id).cancel_requested
    with pytest.raises(jobs.JobNotFound):
        jobs.request_cancel(session=session, job_id="nope")


def test_cursor_pages_through_equal_timestamps(session):
    same = datetime(2026, 1, 1, tzinfo=UTC)
    made = [add_job(session, created_at=same).id for _ in range(5)]
    seen, cursor = [], None
    while True:
        page, cursor = jobs.list_jobs(session, limit=2, cursor=cursor)
        seen += [j.id for j in page]
        if cursor is None:
            break
    assert seen == sorted(made, reverse=True)
    with pytest.raises(jobs.InvalidCursor):
        jobs.list_jobs(session, cursor="bm9wZQ")
    assert [j.id for j in jobs.list_jobs(session, states=[JobState.QUEUED], owner="bob")[0]] == []


def test_progress_eta_falls_back_to_started_at(session):
    job = add_job(session, state="running")
    now = time.time()
    job.started_at = datetime.fromtimestamp(now - 100, UTC)
    job.step, job.total_steps, job.latest = 50, 100, {"time": now}
    p = progress_of(job, now=now)
    assert p["fraction"] == 0.5 and p["eta_s"] == pytest.approx(100, abs=1)
    job.state = "succeeded"
    assert progress_of(job)["eta_s"] == 0.0
