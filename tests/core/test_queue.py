"""Stored queue positions and start ETAs (core.queue): after every kind of queue change and scheduling
pass they equal what walking the whole queue gives, and a pass reads no more when the queue is longer."""

from __future__ import annotations

import time

from sqlalchemy import event, select, update

from core import lifecycle
from core.eta import start_etas
from core.models import Gpu, Job
from core.queue import start_eta_s
from core.scheduler import GpuInfo, register_box, schedule
from tests.core.factories import add_job, queue_positions


def stored(session) -> dict[str, int]:
    session.expire_all()
    rows = session.execute(select(Job.id, Job.state, Job.queue_position).where(Job.queue_position.is_not(None)))
    out = {}
    for job_id, state, pos in rows:
        assert state == "queued", f"{job_id} left the queue ({state}) but kept position {pos}"
        out[job_id] = pos
    return out


def check(session) -> dict[str, int]:
    schedule(session, None)
    positions = stored(session)
    assert positions == queue_positions(session)
    return positions


def test_positions_follow_submits_placements_cancels_and_requeues(session):
    register_box(session, "box1", [GpuInfo(i, "RTX 4090") for i in range(2)])
    session.commit()
    a, b, c = add_job(session, gpus=2), add_job(session), add_job(session)
    positions = check(session)  # a takes both GPUs; b and c wait
    assert session.get(Job, a.id).state == "starting" and positions == {b.id: 1, c.id: 2}
    d = add_job(session)  # appended at the tail
    assert check(session) == {b.id: 1, c.id: 2, d.id: 3}
    urgent = add_job(session, priority=5)  # jumps the queue: everyone behind moves
    assert check(session) == {urgent.id: 1, b.id: 2, c.id: 3, d.id: 4}
    lifecycle.cancel(session, c.id)
    session.commit()
    assert check(session) == {urgent.id: 1, b.id: 2, d.id: 3}
    # a goes back to the queue (its GPUs freed): urgent takes one GPU, a (older than b) waits for two at the head.
    lifecycle.requeue(session, a.id, attempt=1, from_states=[lifecycle.S.STARTING])
    session.commit()
    assert check(session) == {a.id: 1, b.id: 2, d.id: 3}
    session.execute(update(Gpu).values(job_id=None))  # every GPU frees up: the head is placed
    session.commit()
    assert check(session) == {b.id: 1, d.id: 2}


def test_start_etas_are_stored_for_the_head_and_cleared_when_they_lapse(session):
    now = time.time()
    register_box(session, "box1", [GpuInfo(0, "RTX 4090")])
    session.commit()
    running = add_job(
        session,
        state="running",
        box="box1",
        gpu_ids=[0],
        step=50,
        total_steps=100,
        latest={"time": now},
        rate_origin={"step": 0, "time": now - 100},
    )
    session.execute(update(Gpu).values(job_id=running.id))
    session.commit()
    first, second = add_job(session), add_job(session)
    schedule(session, None)
    session.expire_all()
    expected = start_etas(session, now=time.time())
    assert expected[first.id] is not None and expected.get(second.id) is None
    assert abs(start_eta_s(session.get(Job, first.id)) - expected[first.id]) <= 2
    assert start_eta_s(session.get(Job, second.id)) is None
    lifecycle.cancel(session, first.id)
    session.commit()
    schedule(session, None)
    session.expire_all()
    assert session.get(Job, first.id).start_eta_at is None, "a job that left the queue shows no ETA"
    assert start_eta_s(session.get(Job, second.id)) is not None, "the new head gets the ETA"


def _statements(session, run) -> int:
    engine = session.get_bind()
    count = [0]

    def counter(*_args) -> None:
        count[0] += 1

    event.listen(engine, "before_cursor_execute", counter)
    try:
        run()
    finally:
        event.remove(engine, "before_cursor_execute", counter)
    return count[0]


def test_a_pass_costs_the_same_statements_at_5_and_at_200_queued(session):
    register_box(session, "box1", [GpuInfo(0, "RTX 4090")])
    session.commit()
    holder = add_job(session, state="running", box="box1", gpu_ids=[0])
    session.execute(update(Gpu).values(job_id=holder.id))
    session.commit()
    counts = []
    for n in (5, 200):
        session.execute(update(Job).where(Job.state == "queued").values(state="succeeded", queue_position=None))
        session.commit()
        for _ in range(n):
            add_job(session)
        schedule(session, None)  # positions the queue
        add_job(session)  # one submit
        counts.append(_statements(session, lambda: schedule(session, None)))
        assert stored(session) == queue_positions(session)
    assert counts[0] == counts[1], f"statements per pass after a submit: {counts}"
