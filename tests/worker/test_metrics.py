"""Step metrics and job progress in the database (SQLite and Postgres): upsert, fencing by attempt."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import select

from core.db import make_engine, make_sessionmaker, upgrade
from core.models import Job, JobMetric
from tests.core.databases import BACKENDS, fresh_database
from worker.metrics import store_metrics


@pytest.fixture(scope="module", params=BACKENDS)
def sessions(request, tmp_path_factory) -> Iterator[object]:
    with fresh_database(request.param, tmp_path_factory.mktemp("db")) as url:
        upgrade(url)
        engine = make_engine(url)
        yield make_sessionmaker(engine)
        engine.dispose()


def _step(step: int, loss: float) -> dict:
    return {
        "type": "step",
        "step": step,
        "epoch": 0,
        "loss": loss,
        "lr": 1e-3,
        "samples_per_s": 10.0,
        "tokens_per_s": 640.0,
        "mfu": None,
        "gpu_mem_gb": None,
        "time": 100.0 + step,
    }


def test_store_metrics_upserts_and_updates_progress(sessions):
    with sessions() as s:
        s.add(Job(id="jm1", name="m", owner="u", state="running", spec={}, gpus=1, attempt=1))
        s.commit()
        assert store_metrics(
            s, job_id="jm1", attempt=1, steps=[_step(1, 3.0), _step(2, 2.5)], fields={"total_steps": 10}
        )
        s.commit()
        # A resumed attempt re-trains step 2 (after its checkpoint at 1): the newest row wins.
        s.get(Job, "jm1").attempt = 2
        s.commit()
        assert store_metrics(s, job_id="jm1", attempt=2, steps=[_step(2, 2.4), _step(2, 2.3), _step(3, 2.0)], fields={})
        s.commit()
        rows = s.scalars(select(JobMetric).where(JobMetric.job_id == "jm1").order_by(JobMetric.step)).all()
        assert [(r.step, r.loss, r.attempt) for r in rows] == [(1, 3.0, 1), (2, 2.3, 2), (3, 2.0, 2)]
        job = s.get(Job, "jm1")
        s.refresh(job)
        assert (job.step, job.total_steps, job.latest["loss"]) == (3, 10, 2.0)


def test_a_stale_attempt_writes_nothing(sessions):
    with sessions() as s:
        s.add(Job(id="jm2", name="m", owner="u", state="running", spec={}, gpus=1, attempt=2))
        s.commit()
        assert not store_metrics(s, job_id="jm2", attempt=1, steps=[_step(1, 3.0)], fields={"total_steps": 5})
        s.commit()
        assert s.scalars(select(JobMetric).where(JobMetric.job_id == "jm2")).all() == []
        assert s.get(Job, "jm2").total_steps is None


def _eval(step: int, loss: float) -> dict:
    return {
        "type": "eval",
        "step": step,
        "eval_loss": loss,
        "perplexity": 2.0**loss,
        "tokens": 99,
        "time": 200.0 + step,
    }


def test_eval_losses_join_their_steps_rows_and_stay_latest_across_later_steps(sessions):
    with sessions() as s:
        s.add(Job(id="jm3", name="m", owner="u", state="running", spec={}, gpus=1, attempt=1))
        s.commit()
        # The eval at step 2 arrives with its step; the one at step 4 before its step's row exists.
        assert store_metrics(s, job_id="jm3", attempt=1, steps=[_step(1, 3.0), _step(2, 2.5), _eval(2, 2.9)], fields={})
        assert store_metrics(s, job_id="jm3", attempt=1, steps=[_eval(4, 2.6)], fields={})
        assert store_metrics(s, job_id="jm3", attempt=1, steps=[_step(3, 2.2), _step(4, 2.0)], fields={})
        s.commit()
        rows = s.scalars(select(JobMetric).where(JobMetric.job_id == "jm3").order_by(JobMetric.step)).all()
        assert [(r.step, r.loss, r.eval_loss) for r in rows] == [
            (1, 3.0, None),
            (2, 2.5, 2.9),
            (3, 2.2, None),
            (4, 2.0, 2.6),
        ]
        assert rows[-1].time == 104.0  # the step's time, not the eval's
        job = s.get(Job, "jm3")
        s.refresh(job)
        assert (job.step, job.latest["loss"], job.latest["eval_loss"]) == (4, 2.0, 2.6)
