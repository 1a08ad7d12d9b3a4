"""The GPU busy check with an injected NVML process list (there is no GPU here), on SQLite and Postgres:
a GPU used outside trainbox is not launched on, is flagged for GET /gpus, and is given back when free."""

from __future__ import annotations

import os

from sqlalchemy import select

from core.db import session_scope
from core.models import Gpu
from core.scheduler import GpuInfo, register_box, schedule
from tests.worker.conftest import BOX
from tests.worker.test_runner import _job, _placed_job, _stream
from worker import gpucheck, runner


def test_busy_means_a_process_that_is_not_ours():
    procs = {0: [], 1: [4242], 2: [os.getpid()]}
    assert gpucheck.busy_indices([0, 1, 2], procs, own_pids=[os.getpid()]) == [1]
    assert gpucheck.busy_indices([0, 2], procs, own_pids=[os.getpid()]) == []
    assert gpucheck.busy_indices([1], None) == [], "no NVML (a CPU box): nothing is busy"
    assert gpucheck.busy_indices([5], procs) == [], "a GPU NVML does not list has no process"


def _flags() -> list[tuple[int, bool, str | None]]:
    with session_scope() as s:
        return [tuple(r) for r in s.execute(select(Gpu.index, Gpu.busy, Gpu.job_id).order_by(Gpu.index))]


def _gpu_box(n: int = 3) -> None:
    with session_scope() as s:
        register_box(s, BOX, [GpuInfo(i, "NVIDIA GeForce RTX 4090", 24564) for i in range(n)])


def test_a_busy_assigned_gpu_requeues_the_job_unlaunched(db, monkeypatch):
    _gpu_box()
    job_id, attempt = _placed_job(gpus=2)
    assert _job(job_id).gpu_ids == [0, 1]
    monkeypatch.setattr(gpucheck, "nvml_processes", lambda: {0: [], 1: [999_999], 2: []})
    monkeypatch.setattr(runner, "reschedule", lambda: None)
    assert runner.run_attempt(job_id, attempt) == "requeued"
    job = _job(job_id)
    assert (job.state, job.attempt, job.box, job.gpu_ids, job.started_at) == ("queued", attempt, None, None, None)
    assert _flags() == [(0, False, None), (1, True, None), (2, False, None)]
    assert not (runner.get_settings().run_dir(job_id) / "events.jsonl").exists(), "nothing launched"
    [requeued] = [e for e in _stream(job_id) if e["type"] == "state"]
    assert (requeued["state"], requeued["attempt"], requeued["busy_gpus"]) == ("queued", attempt, [1])
    with session_scope() as s:
        [placed] = schedule(s, None)
    assert placed.job_id == job_id and placed.gpu_ids == [0, 2] and placed.attempt == attempt, "around the busy one"
    # The foreign process leaves: the sweep clears the flag and the GPU is given out again.
    gpucheck.refresh_busy(BOX, processes={0: [], 1: [], 2: []})
    assert _flags()[1] == (1, False, None)
    other, _ = _placed_job(gpus=1)
    assert _job(other).gpu_ids == [1]


def test_the_sweep_flags_busy_free_gpus_and_the_scheduler_skips_them(db):
    _gpu_box()
    gpucheck.refresh_busy(BOX, processes={0: [123], 1: [], 2: []})
    assert _flags() == [(0, True, None), (1, False, None), (2, False, None)]
    job_id, _ = _placed_job(gpus=1)
    assert _job(job_id).gpu_ids == [1]
    gpucheck.refresh_busy(BOX, processes={0: [123], 1: [555], 2: []})
    assert _flags()[1] == (1, False, job_id), "a held GPU is its job's business, not flagged"


def test_cpu_boxes_are_never_checked(db, monkeypatch):
    job_id, attempt = _placed_job(gpus=1)  # the fixture's box offers CPU slots
    assert gpucheck.requeue_if_busy(job_id, attempt, processes={0: [1], 1: [1]}) == []
    gpucheck.refresh_busy(BOX, processes={0: [1], 1: [1]})
    assert [busy for _i, busy, _j in _flags()] == [False, False]
    assert _job(job_id).state == "starting"
