"""The job lifecycle: each state change with its side effects (GPUs, attempt, lease) and its event;
and the rule that nothing outside core/lifecycle.py (and the compare-and-set in core/states.py) writes
`jobs.state`."""

from __future__ import annotations

import ast
from pathlib import Path

from sqlalchemy import select

from core import lifecycle
from core.models import Gpu, Job
from core.scheduler import GpuInfo, register_box, schedule
from core.states import JobState as S
from tests.core.factories import add_job, held_gpus

ROOT = Path(__file__).resolve().parents[2]
# Where a job's state may be written: the lifecycle, and the compare-and-set it uses.
STATE_WRITERS = {"core/lifecycle.py", "core/states.py"}


def _placed(session, gpus: int = 1) -> Job:
    register_box(session, "b", [GpuInfo(i, f"g{i}") for i in range(2)])
    session.commit()
    job = add_job(session, gpus=gpus)
    [placed] = schedule(session, None)
    assert placed.job_id == job.id
    session.refresh(job)
    return job


def test_start_then_finish_frees_the_gpus_and_clears_the_lease(session):
    job = _placed(session)
    assert lifecycle.start(session, job.id, attempt=1, lease_owner="me", lease_s=30) == {
        "type": "state",
        "state": "running",
        "attempt": 1,
    }
    assert lifecycle.start(session, job.id, attempt=1, lease_owner="me", lease_s=30) is None  # a duplicate
    error = {"type": "oom", "message": "boom"}
    event = lifecycle.finish(session, job.id, attempt=1, to=S.FAILED, error=error)
    assert event == {"type": "state", "state": "failed", "attempt": 1, "error": error}
    session.commit()
    session.refresh(job)
    assert (job.state, job.error, job.lease_owner, job.lease_expires_at) == ("failed", error, None, None)
    assert held_gpus(session) == {}


def test_requeue_bumps_the_attempt_in_the_same_write_or_keeps_it(session):
    job = _placed(session)
    assert lifecycle.start(session, job.id, attempt=1, lease_owner="me", lease_s=30)
    assert lifecycle.requeue(session, job.id, attempt=1, reason="lost")["state"] == "queued"
    session.commit()
    session.refresh(job)
    assert (job.state, job.attempt, job.box, job.gpu_ids, job.lease_owner) == ("queued", 2, None, None, None)
    assert held_gpus(session) == {}
    assert lifecycle.requeue(session, job.id, attempt=1) is None  # a stale attempt writes nothing
    [placed] = schedule(session, None)
    assert lifecycle.requeue(session, job.id, attempt=placed.attempt, next_attempt=False)
    session.commit()
    session.refresh(job)
    assert (job.state, job.attempt) == ("queued", 2) and held_gpus(session) == {}


def test_cancel_each_state(session):
    queued = add_job(session)
    assert lifecycle.cancel(session, queued.id)["state"] == "cancelled"
    assert lifecycle.cancel(session, queued.id) is None  # terminal: nothing to do
    job = _placed(session)
    assert lifecycle.cancel(session, job.id)["state"] == "cancelling"
    assert lifecycle.cancel(session, job.id) is None  # idempotent
    assert held_gpus(session) == {job.id: [("b", 0)]}  # the processes may still run: GPUs kept
    assert lifecycle.cancel(session, job.id, attempt=1, stopped=True)["state"] == "cancelled"
    session.commit()
    assert held_gpus(session) == {}
    assert session.scalar(select(Gpu.job_id).where(Gpu.index == 0)) is None


def _state_writes(path: Path) -> list[str]:
    """Calls in `path` that write a job's state: transition(...) / require_transition(...), or
    .values(state=...) / update(...).values(..., state=...)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if name in ("transition", "require_transition"):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}()")
        if name == "values" and any(k.arg == "state" for k in node.keywords):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} .values(state=...)")
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Assign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(
                isinstance(t, ast.Attribute) and t.attr == "state" and getattr(t.value, "id", "") == "job"
                for t in targets
            ):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} job.state = ...")
    return found


def test_only_the_lifecycle_writes_job_state():
    writes = []
    for package in ("api", "core", "worker", "client", "trainer"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if str(path.relative_to(ROOT)) not in STATE_WRITERS:
                writes += _state_writes(path)
    assert writes == [], "job state changes belong in core/lifecycle.py"
