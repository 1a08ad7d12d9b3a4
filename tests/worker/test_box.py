"""This box: devices offered, registration, and the sweep (re-sending stale `starting` jobs, placing
queued ones) on SQLite and Postgres."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from core import keys
from core.db import session_scope
from core.models import Box, Gpu, Job, utcnow
from core.settings import get_settings
from tests.worker.conftest import BOX
from tests.worker.test_runner import _job, _placed_job
from worker import box as box_mod
from worker import celery_app


@pytest.fixture
def sent(monkeypatch) -> list[tuple[str, int, str]]:
    calls: list[tuple[str, int, str]] = []
    monkeypatch.setattr(celery_app, "dispatch", lambda *a: calls.append(a))
    return calls


def test_a_box_without_gpus_offers_its_cpu_slots(monkeypatch):
    if box_mod.detect_gpus():
        pytest.skip("this machine has GPUs")
    monkeypatch.setenv("TRAINBOX_CPU_SLOTS", "3")
    get_settings.cache_clear()
    try:
        devices = box_mod.box_devices()
    finally:
        get_settings.cache_clear()
    assert [(d.index, d.name) for d in devices] == [(0, "cpu-slot"), (1, "cpu-slot"), (2, "cpu-slot")]


def test_register_names_the_box_after_the_setting(db, monkeypatch):
    monkeypatch.setenv("TRAINBOX_BOX_NAME", "box-b")
    get_settings.cache_clear()
    assert box_mod.register(box_mod.box_devices()) == "box-b"
    with session_scope() as s:
        assert s.get_one(Box, "box-b").queue == keys.box_queue("box-b")
        assert len(s.scalars(select(Gpu).where(Gpu.box == "box-b")).all()) == get_settings().cpu_slots


def test_sweep_resends_stale_starting_jobs_only(db, sent):
    stale_id, stale_attempt = _placed_job()
    fresh_id, _ = _placed_job()
    with session_scope() as s:
        s.get_one(Job, stale_id).updated_at = utcnow() - timedelta(hours=1)
    assert box_mod.resend_stale_starting(BOX, older_than_s=60) == 1
    assert sent == [(stale_id, stale_attempt, keys.box_queue(BOX))]
    assert _job(fresh_id).state == "starting"


def test_sweep_places_queued_jobs_and_marks_the_box_alive(db, sent):
    with session_scope() as s:
        s.get_one(Box, BOX).heartbeat_at = utcnow() - timedelta(days=1)
    first, _ = _placed_job()  # one slot taken; the sweep must place a queued job on the other
    from core.jobs import create_job
    from trainer.spec import JobSpec

    spec = JobSpec.model_validate(
        {
            "name": "q",
            "model": "preset:tiny",
            "dataset": {"path": "x.jsonl"},
            "gpus": 1,
            "deepspeed": {"train_batch_size": 2},
        }
    )
    with session_scope() as s:
        queued = create_job(session=s, owner="u", spec=spec).job.id
    box_mod.sweep(BOX)
    assert _job(queued).state == "starting" and [c[0] for c in sent] == [queued]
    with session_scope() as s:
        assert s.get_one(Box, BOX).heartbeat_at > utcnow() - timedelta(minutes=1)


def test_a_job_whose_message_was_never_sent_still_runs_once(db, fake, monkeypatch):
    """The row committed as `starting`, the enqueue skipped (the API died, or Redis lost the message):
    the sweep re-sends it and the job runs, once."""
    from tests.worker.test_runner import _runs_started, _trainers_left
    from worker import runner

    fake["argv"] = ["--steps", "3"]
    results: list[str] = []
    monkeypatch.setattr(
        celery_app, "dispatch", lambda job_id, attempt, _q: results.append(runner.run_attempt(job_id, attempt))
    )
    job_id, _attempt = _placed_job()  # placed; its message went nowhere
    with session_scope() as s:
        s.get_one(Job, job_id).updated_at = utcnow() - timedelta(hours=1)
    box_mod.sweep(BOX)
    box_mod.sweep(BOX)  # a second sweep finds nothing stale
    assert results == ["succeeded"] and _job(job_id).state == "succeeded"
    assert _runs_started(job_id) == 1 and _trainers_left(job_id) == []
