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
