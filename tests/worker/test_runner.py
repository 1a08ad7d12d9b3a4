"""One attempt from claim to end (`run_attempt`, the body of `run_job`) on SQLite and Postgres with
real Redis, the fake trainer standing in for DeepSpeed: claim by compare-and-set, duplicate delivery,
cancel before launch, failure, worker shutdown, GPUs freed, metrics and stream written."""

from __future__ import annotations

import json
import threading
from typing import Any

import psutil
import pytest
from redis import Redis
from sqlalchemy import select

from core import events as job_events
from core import keys
from core.db import session_scope
from core.jobs import create_job, request_cancel
from core.models import Gpu, Job, JobMetric
from core.scheduler import schedule
from core.settings import get_settings
from tests.helpers import lock_holder, wait_for
from tests.worker.conftest import BOX, RELAY_REDIS_URL
from trainer.spec import JobSpec
from worker import runner


def _placed_job(gpus: int = 1) -> tuple[str, int]:
    spec = JobSpec.model_validate(
        {
            "name": "fake",
            "model": "preset:tiny",
            "dataset": {"path": "x.jsonl"},
            "gpus": gpus,
            "deepspeed": {"train_batch_size": 2 * gpus},
        }
    )
    with session_scope() as s:
        job = create_job(session=s, owner="u", spec=spec).job
        sent: list[tuple[str, int, str]] = []
        schedule(s, lambda *a: sent.append(a))
    assert sent and sent[0][2] == keys.box_queue(BOX)
    return job.id, sent[0][1]


def _job(job_id: str) -> Job:
    with session_scope() as s:
        return s.get_one(Job, job_id)


def _held() -> list[str | None]:
    with session_scope() as s:
        return list(s.scalars(select(Gpu.job_id).order_by(Gpu.index)))


def _stream(job_id: str) -> list[dict[str, Any]]:
    r = Redis.from_url(RELAY_REDIS_URL)
    try:
        return [job_events.decode(f) for _i, f in r.xrange(keys.job_events(job_id))]
    finally:
        r.close()


def _runs_started(job_id: str) -> int:
    """How many trainer runs began in the job's run dir (one `start` event each)."""
    events = get_settings().run_dir(job_id) / "events.jsonl"
    lines = events.read_text().splitlines() if events.exists() else []
    return sum(json.loads(line)["type"] == "start" for line in lines)


def _trainers_left(job_id: str) -> list[Any]:
    run_dir = str(get_settings().run_dir(job_id))
    return [p for p in psutil.process_iter(["cmdline"]) if run_dir in " ".join(p.info["cmdline"] or [])]


def test_run_succeeds_once_and_a_duplicate_does_nothing(db, fake):
    fake["argv"] = ["--steps", "4"]
    job_id, attempt = _placed_job(gpus=2)
    assert _held() == [job_id, job_id]
    # The message delivered twice at once: one claim wins, the other runs nothing.
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(runner.run_attempt(job_id, attempt))) for _ in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == ["skipped", "succeeded"]
    assert _runs_started(job_id) == 1 and _trainers_left(job_id) == []
    job = _job(job_id)
    assert (job.state, job.step, job.total_steps, job.lease_owner) == ("succeeded", 4, 4, None)
    assert job.latest["loss"] == pytest.approx(2.5)
    assert _held() == [None, None]
    with session_scope() as s:
        assert [m.step for m in s.scalars(select(JobMetric).where(JobMetric.job_id == job_id))] == [1, 2, 3, 4]
    stream = _stream(job_id)
    states = [e["state"] for e in stream if e["type"] == "state"]
    assert states == ["running", "succeeded"]
    assert [e["step"] for e in stream if e["type"] == "step"] == [1, 2, 3, 4]
    assert runner.run_attempt(job_id, attempt) == "skipped", "a late delivery runs nothing"
    assert _runs_started(job_id) == 1


def test_failure_records_type_and_log_tail(db, fake):
    fake["argv"] = ["--steps", "2", "--exit", "1", "--error-type", "oom"]
    job_id, attempt = _placed_job()
    assert runner.run_attempt(job_id, attempt) == "failed"
    job = _job(job_id)
    assert job.error["type"] == "oom" and "RuntimeError: boom" in job.error["log_tail"]
    assert _held() == [None, None]


def test_cancel_before_the_message_arrives_launches_nothing(db, fake):
    job_id, attempt = _placed_job()
    with session_scope() as s:
        assert request_cancel(session=s, job_id=job_id).state == "cancelling"
    assert runner.run_attempt(job_id, attempt) == "cancelled"
    assert _job(job_id).state == "cancelled" and _held() == [None, None]
    assert not (get_settings().run_dir(job_id) / "events.jsonl").exists()
    assert _runs_started(job_id) == 0 and _trainers_left(job_id) == []


def test_cancel_while_running(db, fake):
    fake["argv"] = ["--steps", "100000", "--step-s", "0.05"]
    job_id, attempt = _placed_job()
    result: dict[str, str] = {}
    t = threading.Thread(target=lambda: result.update(state=runner.run_attempt(job_id, attempt)))
    t.start()
    wait_for(lambda: (_job(job_id).step or 0) >= 2, timeout=30, what="steps stored")
    with session_scope() as s:
        request_cancel(session=s, job_id=job_id)
    t.join(30)
    assert result["state"] == "cancelled" and _job(job_id).state == "cancelled" and _held() == [None, None]
    assert _runs_started(job_id) == 1 and _trainers_left(job_id) == []


def test_worker_shutdown_requeues_for_the_next_attempt(db, fake):
    fake["argv"] = ["--steps", "100000", "--step-s", "0.05"]
    job_id, attempt = _placed_job()
    result: dict[str, str] = {}
    t = threading.Thread(target=lambda: result.update(state=runner.run_attempt(job_id, attempt)))
    t.start()
    try:
        wait_for(lambda: (_job(job_id).step or 0) >= 1, timeout=30, what="steps stored")
        runner.shutting_down.set()
        t.join(30)
    finally:
        runner.shutting_down.clear()
    job = _job(job_id)
    assert result["state"] == "queued" and (job.state, job.attempt, job.box, job.gpu_ids) == ("queued", 2, None, None)
    assert _held() == [None, None]
    assert runner.run_attempt(job_id, attempt) == "skipped", "the old attempt is fenced off"
    assert _runs_started(job_id) == 1 and _trainers_left(job_id) == []
    assert "checkpoint" in (get_settings().run_dir(job_id) / "events.jsonl").read_text(), "SIGTERM checkpointed"


def _claimed_with_lease_expired(seconds_ago: float, gpus: int = 1) -> tuple[str, int]:
    from datetime import timedelta

    from core.models import utcnow

    job_id, attempt = _placed_job(gpus=gpus)
    assert runner.claim(job_id, attempt)
    with session_scope() as s:
        s.get_one(Job, job_id).lease_expires_at = utcnow() - timedelta(seconds=seconds_ago)
    return job_id, attempt


def test_an_expired_lease_requeues_the_job_with_the_next_attempt(db, redis):
    from worker.reaper import reap_expired

    fresh_id, _ = _claimed_with_lease_expired(seconds_ago=-30)  # still valid
    late_id, _ = _claimed_with_lease_expired(seconds_ago=1)  # expired, but within the stop grace
    assert reap_expired(redis) == []
    with session_scope() as s:
        s.get_one(Job, late_id).lease_expires_at = s.get_one(Job, late_id).lease_expires_at.replace(year=2000)
    assert reap_expired(redis) == [(late_id, "queued")]
    job = _job(late_id)
    assert (job.state, job.attempt, job.gpu_ids, job.lease_owner) == ("queued", 2, None, None)
    assert _held() == [fresh_id, None]
    assert [e["state"] for e in _stream(late_id) if e["type"] == "state"] == ["queued"]
    assert runner.run_attempt(late_id, 1) == "skipped", "the lost attempt's message is fenced off"


def test_the_last_attempt_lost_fails_and_an_expired_cancel_ends_cancelled(db):
    from worker.reaper import reap_expired

    last_id, _ = _claimed_with_lease_expired(seconds_ago=3600)
    with session_scope() as s:
        s.get_one(Job, last_id).max_attempts = 1
    cancel_id, _ = _claimed_with_lease_expired(seconds_ago=3600)
    with session_scope() as s:
        request_cancel(session=s, job_id=cancel_id)
    assert sorted(reap_expired()) == sorted([(last_id, "failed"), (cancel_id, "cancelled")])
    assert _job(last_id).error["type"] == "lost"
    assert _held() == [None, None]


def test_cpu_ranks_share_the_cores_without_oversubscribing(db: str) -> None:
    """OMP_NUM_THREADS is per rank: a job's ranks together get at most the box's cores."""
    import os

    job_id, attempt = _placed_job(gpus=2)
    launch = runner.build_launch(job_id, attempt)
    assert launch.accelerator == "cpu" and len(launch.devices) == 2
    assert launch.cpu_threads is not None and launch.cpu_threads >= 1
    assert launch.cpu_threads * len(launch.devices) <= max(2, os.cpu_count() or 1)


# --- the real trainer (DeepSpeed on CPU ranks) --------------------------------------------------------


def _placed_real_job() -> tuple[str, int]:
    """A 2-rank preset:tiny job over a small corpus in the data root, placed on the test box."""
    from tests.worker.conftest import tiny_spec, write_corpus

    write_corpus(get_settings().data_root / "corpus.jsonl")
    spec = JobSpec.model_validate(tiny_spec("real", steps=2))
    with session_scope() as s:
        job = create_job(session=s, owner="u", spec=spec).job
        sent: list[tuple[str, int, str]] = []
        schedule(s, lambda *a: sent.append(a))
    return job.id, sent[0][1]


def _run_bounded(job_id: str, attempt: int, timeout: float) -> str:
    """run_attempt in a thread; a run still going after `timeout` is cancelled (and the test fails)."""
    result: list[str] = []
    t = threading.Thread(target=lambda: result.append(runner.run_attempt(job_id, attempt)), daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        with session_scope() as s:
            request_cancel(session=s, job_id=job_id)
        t.join(120)
        pytest.fail(f"job {job_id} was still {result or 'running'} after {timeout:.0f}s; cancelled it")
    return result[0]


@pytest.mark.slow
@pytest.mark.parametrize("db", ["postgres"], indirect=True)
def test_a_job_whose_ranks_never_start_fails_as_launch_error_and_leaves_nothing(db, monkeypatch, tmp_path):
    """The ranks wait on a DeepSpeed build lock a hung builder holds: the job fails `launch_error`
    after the start-up timeout, naming the lock and its holder, instead of sitting `running`."""
    monkeypatch.setattr(runner, "reschedule", lambda: None)
    ext = tmp_path / "ext"
    lock = ext / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    monkeypatch.setenv("TRAINBOX_TORCH_EXTENSIONS_DIR", str(ext))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(ext))
    monkeypatch.setenv("TRAINBOX_START_TIMEOUT_S", "20")
    get_settings.cache_clear()
    with lock_holder(lock) as holder:
        job_id, attempt = _placed_real_job()
        assert _run_bounded(job_id, attempt, timeout=150) == "failed"
    job = _job(job_id)
    assert job.error["type"] == "launch_error"
    assert job.error["message"].startswith("no rank started within 20 s; DeepSpeed build locks: "), job.error
    assert f"{lock} (held by pid {holder.pid})" in job.error["message"]
    assert _runs_started(job_id) == 0 and _trainers_left(job_id) == []
    assert _held() == [None, None]
    assert [e["state"] for e in _stream(job_id) if e["type"] == "state"] == ["running", "failed"]


@pytest.mark.slow
@pytest.mark.parametrize("db", ["postgres"], indirect=True)
def test_a_job_succeeds_while_other_programs_take_its_ports(db, monkeypatch):
    """29500.. and the MASTER_PORT its ranks get (taken the moment a rank shows it) are held by another
    program: the run succeeds. (Its worker also turns the shared token cache off: the ranks get that
    setting and tokenize into the run dir.)"""
    from tests.trainer.conftest import PortSquatter
    from trainer.tokencache import TOKEN_CACHE_DIR

    monkeypatch.setattr(runner, "reschedule", lambda: None)
    monkeypatch.setenv("TRAINBOX_TOKEN_CACHE_BYTES", "0")
    get_settings.cache_clear()
    job_id, attempt = _placed_real_job()
    with PortSquatter(str(get_settings().run_dir(job_id))) as squatter:
        assert _run_bounded(job_id, attempt, timeout=300) == "succeeded", _job(job_id).error
    assert len(squatter.ports) == 1 and all(squatter.ports.values()), squatter.ports
    assert _runs_started(job_id) == 1 and _trainers_left(job_id) == []
    assert not (get_settings().data_root / TOKEN_CACHE_DIR).exists()
    assert list((get_settings().run_dir(job_id) / "data").glob("data-*.json")), "tokenized into the run dir"


def test_following_a_job_shows_every_state_in_order(db, fake):
    """Submitted through the API, placed by the scheduler, run by the worker: one publisher for all."""
    from fastapi.testclient import TestClient

    from api.app import create_app
    from core.users import create_token, create_user
    from tests.api.test_events import read_all

    fake["argv"] = ["--steps", "2"]
    settings = get_settings()
    (settings.data_root / "x.jsonl").parent.mkdir(parents=True, exist_ok=True)
    (settings.data_root / "x.jsonl").write_text(json.dumps({"text": "some words " * 40}) + "\n")
    sent: list[tuple[str, int, str]] = []
    with TestClient(create_app(settings, dispatch=lambda *a: sent.append(a))) as client:
        with client.app.state.sessions() as s:  # type: ignore[attr-defined]
            create_user(s, name="u")
            _, token = create_token(s, user_name="u")
        client.headers["Authorization"] = f"Bearer {token}"
        spec = {
            "name": "fake",
            "model": "preset:tiny",
            "dataset": {"path": "x.jsonl"},
            "gpus": 1,
            "seq_len": 16,
            "deepspeed": {"train_batch_size": 2},
        }
        created = client.post("/jobs", json=spec)
        assert created.status_code == 201, created.text
        [(job_id, attempt, _queue)] = sent
        assert runner.run_attempt(job_id, attempt) == "succeeded"
        got = read_all(client, job_id)
    states = [data["state"] for _id, name, data in got if name == "state"]
    assert states == ["queued", "starting", "running", "succeeded"]
