"""50 jobs needing 1-2 slots, submitted at once to a box of 3, run by real trainer processes (the fake
one) on SQLite and Postgres: every job ends, each ran once, and the allocation log the processes wrote
shows at most 3 slots held at any moment and no slot in two jobs at once."""

from __future__ import annotations

import dataclasses
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
from sqlalchemy import select

from core.db import session_scope
from core.jobs import create_job
from core.models import Gpu, Job
from core.scheduler import GpuInfo, register_box, schedule
from core.states import JobState
from tests.helpers import wait_for
from tests.worker.conftest import BOX, FAKE_TRAINER
from trainer.spec import JobSpec
from worker import runner

JOBS = 50
SLOTS = 3


def _spec(i: int) -> JobSpec:
    gpus = 1 + i % 2
    return JobSpec.model_validate(
        {
            "name": f"c{i}",
            "model": "preset:tiny",
            "dataset": {"path": "x.jsonl"},
            "gpus": gpus,
            "deepspeed": {"train_batch_size": 2 * gpus},
        }
    )


def _intervals(log: Path) -> list[tuple[float, float, str, list[int]]]:
    """(start, end, job, devices) per run, from the lines the trainer processes appended."""
    starts: dict[str, float] = {}
    out = []
    for line in log.read_text().splitlines():
        kind, label, t = line.split()
        if kind == "start":
            assert label not in starts, f"{label} started twice"
            starts[label] = float(t)
        else:
            job, devices = label.split(":")
            out.append((starts.pop(label), float(t), job, [int(d) for d in devices.split(",")]))
    assert not starts, f"runs that never ended: {starts}"
    return out


def test_fifty_concurrent_jobs_never_share_a_slot(db, monkeypatch, tmp_path):
    with session_scope() as s:
        register_box(s, BOX, [GpuInfo(i, "cpu-slot") for i in range(SLOTS)])
    log = tmp_path / "allocations.log"
    real_build = runner.build_launch

    def build(job_id: str, attempt: int) -> Any:
        launch = real_build(job_id, attempt)
        label = f"{job_id}:{','.join(map(str, launch.devices))}"
        command = [
            sys.executable,
            str(FAKE_TRAINER),
            "--run-dir",
            str(launch.run_dir),
            "--steps",
            "2",
            # long enough that runs overlap whatever the dispatch latency (the side-by-side check)
            "--step-s",
            "0.15",
            "--alloc-log",
            str(log),
            "--label",
            label,
        ]
        return dataclasses.replace(launch, command=command)

    pool = ThreadPoolExecutor(max_workers=2 * SLOTS)  # more than the slots: the DB must say no, not the pool
    results: list[str] = []
    sent: list[tuple[str, int]] = []
    lock = threading.Lock()

    def run(job_id: str, attempt: int) -> None:
        state = runner.run_attempt(job_id, attempt)
        with lock:
            results.append(state)

    def dispatch(job_id: str, attempt: int, _queue: str) -> None:
        with lock:
            sent.append((job_id, attempt))
        pool.submit(run, job_id, attempt)

    def reschedule() -> None:
        with session_scope() as s:
            schedule(s, dispatch)

    monkeypatch.setattr(runner, "build_launch", build)
    monkeypatch.setattr(runner, "reschedule", reschedule)

    def submit(i: int) -> str:
        # What POST /jobs does: insert and commit, then call the scheduler.
        with session_scope() as s:
            job_id = create_job(session=s, owner=f"u{i % 5}", spec=_spec(i)).job.id
        reschedule()
        return job_id

    with ThreadPoolExecutor(max_workers=10) as submitters:
        ids = list(submitters.map(submit, range(JOBS)))

    def all_ended() -> bool:
        with session_scope() as s:
            states = s.scalars(select(Job.state).where(Job.id.in_(ids))).all()
        return all(JobState(st).is_terminal() for st in states)

    try:
        wait_for(all_ended, timeout=150, interval=0.2, what="all 50 jobs ended")
        wait_for(lambda: len(results) == JOBS, timeout=30, what="every run returned")
    finally:
        pool.shutdown(wait=True)

    with session_scope() as s:
        states = s.scalars(select(Job.state).where(Job.id.in_(ids))).all()
        assert s.scalars(select(Gpu.job_id).where(Gpu.box == BOX, Gpu.job_id.is_not(None))).all() == []
    assert states == ["succeeded"] * JOBS and results == ["succeeded"] * JOBS
    assert sorted(j for j, _ in sent) == sorted(ids), "one dispatch per job"
    runs = _intervals(log)
    assert sorted(job for _s, _e, job, _d in runs) == sorted(ids), "each job ran exactly once"
    gpus_of = {job: len(d) for _s, _e, job, d in runs}
    assert all(gpus_of[i] == 1 + n % 2 for n, i in enumerate(ids)), "each run got the slots it asked for"
    # Sweep the timeline: at every start, the runs then alive hold distinct slots, at most SLOTS of them.
    for start, _end, job, _devices in runs:
        alive = [d for s_, e_, _j, d in runs if s_ <= start < e_]
        held = [d for devices in alive for d in devices]
        assert len(held) == len(set(held)), f"a slot in two jobs when {job} started: {alive}"
        assert len(held) <= SLOTS
    assert max(len([r for r in runs if r[0] <= s_ < r[1]]) for s_, *_ in runs) >= 2, "jobs did run side by side"
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if str(log) in " ".join(p.info["cmdline"] or [])]
    assert leftovers == []
