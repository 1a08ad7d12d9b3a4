"""The job state machine: the transition table and the compare-and-set."""

from __future__ import annotations

import pytest

from core.models import Job
from core.states import (
    ALLOWED,
    TERMINAL_STATES,
    InvalidTransition,
    JobState,
    transition,
)
from tests.core.factories import add_job

S = JobState


def can_transition(src: JobState | str, dst: JobState | str) -> bool:
    return JobState(dst) in ALLOWED[JobState(src)]


def test_terminal_states_have_no_way_out():
    assert {s for s in S if s.is_terminal()} == {S.SUCCEEDED, S.FAILED, S.CANCELLED}
    for s in TERMINAL_STATES:
        assert ALLOWED[s] == frozenset()


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        (S.QUEUED, S.STARTING),
        (S.STARTING, S.RUNNING),
        (S.RUNNING, S.SUCCEEDED),
        (S.RUNNING, S.FAILED),
        (S.RUNNING, S.CANCELLING),
        (S.CANCELLING, S.CANCELLED),
        (S.QUEUED, S.CANCELLED),
        (S.RUNNING, S.QUEUED),  # lost worker: back to the queue with attempt + 1
    ],
)
def test_design_transitions_are_allowed(src, dst):
    assert can_transition(src, dst)


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        (S.QUEUED, S.RUNNING),
        (S.QUEUED, S.SUCCEEDED),
        (S.CANCELLING, S.RUNNING),
        (S.CANCELLING, S.QUEUED),
        (S.SUCCEEDED, S.QUEUED),
        (S.FAILED, S.RUNNING),
        (S.CANCELLED, S.QUEUED),
    ],
)
def test_forbidden_transitions(src, dst):
    assert not can_transition(src, dst)


def test_transition_sets_state_values_and_timestamps(session):
    job = add_job(session)
    assert transition(session, job.id, to=S.STARTING, from_states=[S.QUEUED], values={"box": "b", "gpu_ids": [0]})
    assert transition(session, job.id, to=S.RUNNING, attempt=1)
    session.commit()
    session.refresh(job)
    assert (job.state, job.box, job.gpu_ids) == ("running", "b", [0])
    assert job.started_at is not None and job.finished_at is None
    assert transition(session, job.id, to=S.SUCCEEDED)
    session.commit()
    assert job.state == "succeeded"  # the loaded object was expired by the transition
    assert job.finished_at is not None and job.finished_at.tzinfo is not None


def test_cas_loses_on_wrong_state(session):
    job = add_job(session)
    assert not transition(session, job.id, to=S.RUNNING, from_states=[S.STARTING])
    assert session.get(Job, job.id).state == "queued"


def test_cas_loses_on_stale_attempt(session):
    job = add_job(session, state="running", attempt=2)
    assert not transition(session, job.id, to=S.SUCCEEDED, attempt=1)
    assert transition(session, job.id, to=S.SUCCEEDED, attempt=2)


def test_cas_unknown_job_loses(session):
    assert not transition(session, "nope", to=S.CANCELLED)


def test_terminal_never_changes(session):
    job = add_job(session, state="succeeded")
    for dst in S:
        if dst is S.QUEUED or not any(can_transition(s, dst) for s in S):
            continue
        assert not transition(session, job.id, to=dst), dst
    session.commit()
    session.refresh(job)
    assert job.state == "succeeded"


def test_disallowed_source_is_a_programming_error(session):
    job = add_job(session)
    with pytest.raises(InvalidTransition):
        transition(session, job.id, to=S.RUNNING, from_states=[S.QUEUED])
    with pytest.raises(InvalidTransition):
        transition(session, job.id, to=S.QUEUED, from_states=[S.SUCCEEDED])
    with pytest.raises(ValueError):
        transition(session, job.id, to=S.CANCELLED, values={"no_such_column": 1})


def test_only_one_of_two_racing_writers_wins(sessions):
    with sessions() as s:
        job = add_job(s, state="running")
    with sessions() as a, sessions() as b:
        won_a = transition(a, job.id, to=S.SUCCEEDED, attempt=1)
        a.commit()
        won_b = transition(b, job.id, to=S.FAILED, attempt=1)
        b.commit()
    assert (won_a, won_b) == (True, False)
