"""Start ETAs of queued jobs: the scheduler's order replayed against the running jobs' ETAs."""

from __future__ import annotations

import time

from sqlalchemy import update

from core.eta import start_etas
from core.models import Gpu
from core.scheduler import GpuInfo, register_box
from tests.core.factories import add_job

NOW = time.time()


def _running(session, gpu_ids: list[int], *, step: int, total: int, elapsed_s: float):
    """A running job on box1 whose rate so far gives it (total - step) * elapsed / step seconds to go."""
    origin = {"step": 0, "time": NOW - elapsed_s}
    job = add_job(
        session,
        gpus=len(gpu_ids),
        state="running",
        box="box1",
        gpu_ids=gpu_ids,
        step=step,
        total_steps=total,
        latest={"time": NOW},
        rate_origin=origin,
    )
    session.execute(update(Gpu).where(Gpu.index.in_(gpu_ids)).values(job_id=job.id))
    session.commit()
    return job


def test_queued_jobs_start_when_the_running_ones_should_end(session):
    register_box(session, "box1", [GpuInfo(i, "RTX 4090") for i in range(3)])
    session.commit()
    _running(session, [0, 1], step=50, total=100, elapsed_s=100)  # 100 s to go
    _running(session, [2], step=75, total=100, elapsed_s=90)  # 30 s to go
    big = add_job(session, gpus=2)
    small = add_job(session, gpus=1)
    third = add_job(session, gpus=1)
    huge = add_job(session, gpus=4)
    etas = start_etas(session, now=NOW)
    assert etas[big.id] == 100.0, "needs 2 slots: the second frees at 100 s"
    assert etas[small.id] == 100.0, "one slot frees at 30 s, but nothing passes the job ahead"
    assert etas[third.id] is None, "every slot is then held by a job whose run time is unknown"
    assert etas.get(huge.id) is None, "behind the first job without an ETA: left out, none either"


def test_a_holder_without_an_eta_or_a_busy_gpu_gives_none(session):
    register_box(session, "box1", [GpuInfo(i, "RTX 4090") for i in range(2)])
    session.commit()
    starting = add_job(session, gpus=1, state="starting", box="box1", gpu_ids=[0])
    session.execute(update(Gpu).where(Gpu.index == 0).values(job_id=starting.id))
    session.execute(update(Gpu).where(Gpu.index == 1).values(busy=True))
    session.commit()
    first = add_job(session, gpus=1)
    assert start_etas(session, now=NOW) == {first.id: None}
    session.execute(update(Gpu).where(Gpu.index == 1).values(busy=False))
    session.commit()
    second = add_job(session, gpus=1)
    assert start_etas(session, now=NOW) == {first.id: 0.0, second.id: None}
