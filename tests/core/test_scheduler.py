"""The scheduler: order, gang allocation, blocking, and no GPU in two jobs under concurrency."""

from __future__ import annotations

import threading

from sqlalchemy import select

from core.models import Gpu, Job
from core.scheduler import (
    GpuInfo,
    free_gpus,
    queue_position_for,
    register_box,
    report_gpu_memory,
    schedule,
)
from core.states import JobState, transition
from tests.core.factories import add_job, held_gpus, queue_positions


def box(session, name="box1", n=3, memory_mb=24564):
    register_box(session, name, [GpuInfo(i, "RTX 4090", memory_mb) for i in range(n)])
    session.commit()


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, job_id, attempt, queue):
        self.calls.append((job_id, attempt, queue))


def run(session, dispatch=None, **kw):
    return schedule(session, dispatch or Recorder(), **kw)


def test_no_boxes_no_placement(session):
    add_job(session)
    assert run(session) == []


def test_places_job_and_dispatches_after_commit(session, sessions):
    box(session)
    job = add_job(session, gpus=2)
    seen = []

    def dispatch(job_id, attempt, queue):
        # Dispatch happens after commit: another session already sees the placement.
        with sessions() as other:
            seen.append(other.get(Job, job_id).state)

    placements = schedule(session, dispatch)
    assert [p.job_id for p in placements] == [job.id]
    assert seen == ["starting"]
    session.refresh(job)
    assert (job.state, job.box, job.gpu_ids) == ("starting", "box1", [0, 1])
    assert held_gpus(session) == {job.id: [("box1", 0), ("box1", 1)]}


def test_priority_then_fifo(session):
    box(session, n=1)
    low = add_job(session, priority=0)
    high = add_job(session, priority=5)
    later_high = add_job(session, priority=5)
    assert queue_positions(session) == {high.id: 1, later_high.id: 2, low.id: 3}
    assert queue_position_for(session, priority=5) == 3
    assert queue_position_for(session, priority=10) == 1
    rec = Recorder()
    run(session, rec)
    assert [c[0] for c in rec.calls] == [high.id]
    for expected in (later_high, low):
        free_gpus(session, rec.calls[-1][0])
        transition(session, rec.calls[-1][0], to=JobState.FAILED)
        session.commit()
        run(session, rec)
        assert rec.calls[-1][0] == expected.id


def test_head_job_blocks_smaller_jobs_behind_it(session):
    box(session, n=3)
    first = add_job(session, gpus=2)
    big = add_job(session, gpus=3)
    small = add_job(session, gpus=1)
    placed = [p.job_id for p in run(session)]
    assert placed == [first.id]  # `small` would fit on the free GPU but must not overtake `big`
    assert session.get(Job, small.id).state == "queued"
    free_gpus(session, first.id)
    transition(session, first.id, to=JobState.CANCELLED)
    session.commit()
    assert [p.job_id for p in run(session)] == [big.id]


def test_job_bigger_than_any_box_does_not_block(session):
    box(session, n=2)
    huge = add_job(session, gpus=4)
    small = add_job(session, gpus=1)
    assert [p.job_id for p in run(session)] == [small.id]
    assert session.get(Job, huge.id).state == "queued"


def test_gang_allocation_stays_on_one_box_best_fit(session):
    box(session, "a", n=2)
    box(session, "b", n=4)
    j1 = add_job(session, gpus=3)
    j2 = add_job(session, gpus=2)
    j3 = add_job(session, gpus=1)
    placements = {p.job_id: p for p in run(session)}
    assert (placements[j1.id].box, placements[j1.id].gpu_ids) == ("b", [0, 1, 2])
    assert (placements[j2.id].box, placements[j2.id].gpu_ids) == ("a", [0, 1])
    assert (placements[j3.id].box, placements[j3.id].gpu_ids) == ("b", [3])
    assert placements[j1.id].queue == "trainbox.box.b"


def test_only_gpus_bound_the_jobs_running_at_once(session):
    """No rendezvous port is handed out (each launcher serves its own on a port the OS assigns), so
    nothing but free GPUs caps how many jobs run: every slot of every box is used, and a freed one
    is used again."""
    for name in ("a", "b"):
        box(session, name=name, n=40)
    jobs = [add_job(session, gpus=1) for _ in range(81)]
    assert len(run(session)) == 80
    free_gpus(session, jobs[0].id)
    transition(session, jobs[0].id, to=JobState.FAILED)
    session.commit()
    [p] = run(session)
    assert p.job_id == jobs[80].id


def test_cancelled_or_cancel_requested_jobs_are_skipped(session):
    box(session, n=1)
    a = add_job(session, cancel_requested=True)
    b = add_job(session)
    assert [p.job_id for p in run(session)] == [b.id]
    assert session.get(Job, a.id).state == "queued"


def test_dispatch_failure_leaves_job_starting(session):
    box(session, n=1)
    job = add_job(session)

    def broken(*_):
        raise ConnectionError("broker down")

    placements = schedule(session, broken)
    assert [p.job_id for p in placements] == [job.id]
    session.refresh(job)
    assert job.state == "starting"


def test_register_box_keeps_allocations_and_drops_vanished_free_gpus(session):
    box(session, n=3)
    job = add_job(session, gpus=1)
    run(session)
    register_box(session, "box1", [{"index": 0, "name": "RTX 4090", "memory_mb": 1}])
    session.commit()
    gpus = session.scalars(select(Gpu).order_by(Gpu.index)).all()
    assert [(g.index, g.job_id, g.memory_mb) for g in gpus] == [(0, job.id, 1)]


def test_stale_box_is_ignored_with_ttl(session):
    box(session, n=1)
    add_job(session)
    assert run(session, box_ttl_s=-1) == []
    assert len(run(session, box_ttl_s=60)) == 1


def test_concurrent_schedulers_never_share_a_gpu(engine, sessions):
    """Many schedulers at once (threads, own sessions): every GPU in at most one job, ports unique."""
    with sessions() as s:
        box(s, "a", n=3)
        box(s, "b", n=2)
        for i in range(30):
            add_job(s, gpus=1 + i % 2)
    dispatched: list[str] = []
    lock = threading.Lock()
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def worker():
        try:
            barrier.wait()
            for _ in range(3):
                with sessions() as s:
                    for p in schedule(s, None):
                        with lock:
                            dispatched.append(p.job_id)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(dispatched) == len(set(dispatched)), "a job was placed twice"
    with sessions() as s:
        starting = s.scalars(select(Job).where(Job.state == "starting")).all()
        assert {j.id for j in starting} == set(dispatched)
        owners = [(j.box, g) for j in starting for g in j.gpu_ids]
        assert len(owners) == len(set(owners)), "a GPU is in two jobs"
        assert sum(j.gpus for j in starting) <= 5
        held = held_gpus(s)
        assert {k: sorted(v) for k, v in held.items()} == {
            j.id: sorted((j.box, g) for g in j.gpu_ids) for j in starting
        }


def test_report_gpu_memory(session):
    box(session, n=2)
    report_gpu_memory(session, "box1", {0: 1234, 1: None})
    session.commit()
    assert [g.memory_used_mb for g in session.scalars(select(Gpu).order_by(Gpu.index))] == [1234, None]


def test_gpu_claim_is_guarded_even_without_the_lock(session):
    """The row-level guard alone refuses a GPU that is already held."""
    from core.scheduler import _claim

    box(session, n=2)
    a, b = add_job(session), add_job(session)
    assert _claim(session, a, "box1", [0])
    assert not _claim(session, b, "box1", [0, 1])  # GPU 0 is a's: nothing of b's claim stays
    session.commit()
    assert held_gpus(session) == {a.id: [("box1", 0)]}
    assert session.get(Job, b.id).state == "queued"
