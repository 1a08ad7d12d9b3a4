"""End to end with real processes: uvicorn, a Celery worker, Redis, SQLite and the real trainer on
2 CPU ranks. One stack serves every test here; each test leaves the box idle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psutil
import pytest

from client.sdk import Client
from tests.helpers import wait_for
from tests.worker.conftest import tiny_spec

pytestmark = pytest.mark.slow


def _state(api: Client, job_id: str) -> str:
    return api.get(job_id)["state"]


def _ended(api: Client, job_id: str) -> dict[str, Any] | None:
    job = api.get(job_id)
    return job if job["state"] in ("succeeded", "failed", "cancelled") else None


def _job_processes(run_dir: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if run_dir in " ".join(p.info["cmdline"] or []) and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            continue
    return out


def _box_idle(api: Client) -> bool:
    return api.gpus()["in_use"] == 0


def test_a_two_rank_job_runs_streams_and_succeeds(api: Client, stack: Any) -> None:
    job = api.submit(tiny_spec("e2e-ok", steps=40, validation_split=0.1, eval_every=20))
    assert job["state"] in ("queued", "starting")

    # While it runs, GET /jobs/{id} shows progress and the latest loss.
    def running_with_loss() -> dict[str, Any] | None:
        j = api.get(job["id"])
        return j if j["state"] == "running" and (j["latest"] or {}).get("loss") else None

    running = wait_for(running_with_loss, timeout=120, what="running with a loss")
    assert running["progress"]["total_steps"] == 40 and 0 < running["progress"]["step"] <= 40
    assert running["gpu_ids"] == [0, 1]

    # An SSE client reads part of the stream, drops, and resumes with Last-Event-ID.
    first: list[Any] = []
    stream = api.events(job["id"])
    for event in stream:
        first.append(event)
        if sum(e.type == "step" for e in first) >= 3:
            break
    stream.close()
    rest = list(api.events(job["id"], last_event_id=first[-1].id))
    events = first + rest
    ids = [e.id for e in events]
    assert len(ids) == len(set(ids)), "no event repeated"
    steps = [e.data["step"] for e in events if e.type == "step"]
    assert steps == list(range(1, 41)), "every step, in order"
    states = [e.data.get("state") for e in events if e.type == "state" and "state" in e.data]
    assert states[0] == "queued" and "running" in states and states[-1] == "succeeded"
    assert any(e.type == "log" for e in events)

    final = api.get(job["id"])
    assert final["state"] == "succeeded" and final["error"] is None
    assert final["progress"]["step"] == 40 and final["latest"]["loss"] == events_loss(events, 40)
    history = api.all_metrics(job["id"])
    assert [(m["step"], m["loss"]) for m in history] == [
        (e.data["step"], e.data["loss"]) for e in events if e.type == "step"
    ]
    # The held-out split is evaluated every 20 steps (the last one being the end): on the stream, in
    # the stored history beside its step, and as the job's latest eval loss.
    evals = {e.data["step"]: e.data["eval_loss"] for e in events if e.type == "eval"}
    assert sorted(evals) == [20, 40]
    assert {m["step"]: m["eval_loss"] for m in history if m["eval_loss"] is not None} == evals
    assert final["latest"]["eval_loss"] == evals[40]
    assert api.logs(job["id"], tail=5).strip()
    wait_for(lambda: _box_idle(api), timeout=10, what="GPUs freed")


def events_loss(events: list[Any], step: int) -> float:
    return next(e.data["loss"] for e in events if e.type == "step" and e.data["step"] == step)


def test_cancel_a_running_job_leaves_no_process(api: Client, stack: Any) -> None:
    job = api.submit(tiny_spec("e2e-cancel", steps=100_000))
    run_dir = str(stack.data_dir / "runs" / job["id"])
    wait_for(lambda: (api.get(job["id"])["progress"]["step"] or 0) >= 2, timeout=120, what="training")
    procs = _job_processes(run_dir)
    assert len(procs) >= 3, "the launcher and two ranks"
    api.cancel(job["id"])
    assert _state(api, job["id"]) in ("cancelling", "cancelled")
    final = wait_for(lambda: _ended(api, job["id"]), timeout=60, what="cancelled")
    assert final["state"] == "cancelled"
    assert not [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert _job_processes(run_dir) == [] and _starts(run_dir) == 1
    wait_for(lambda: _box_idle(api), timeout=10, what="GPUs freed")
    assert api.cancel(job["id"])["state"] == "cancelled", "cancel is idempotent"


def test_bad_data_fails_with_type_and_log_tail(api: Client) -> None:
    job = api.submit(tiny_spec("e2e-bad", dataset="bad.jsonl"))
    final = wait_for(lambda: _ended(api, job["id"]), timeout=120, what="failed")
    assert final["state"] == "failed"
    assert final["error"]["type"] == "invalid"
    assert "line 251" in final["error"]["message"]
    assert final["error"]["log_tail"].strip()
    wait_for(lambda: _box_idle(api), timeout=10, what="GPUs freed")


def test_two_one_slot_jobs_share_the_box_while_a_third_waits(api: Client) -> None:
    a = api.submit(tiny_spec("e2e-a", gpus=1, steps=30))
    b = api.submit(tiny_spec("e2e-b", gpus=1, steps=30))
    c = api.submit(tiny_spec("e2e-c", gpus=1, steps=30))

    def both_running_c_waits() -> bool:
        ja, jb, jc = (api.get(j["id"]) for j in (a, b, c))
        return ja["state"] == jb["state"] == "running" and jc["state"] == "queued" and jc["queue_position"] == 1

    wait_for(both_running_c_waits, timeout=120, what="a and b running together, c queued")
    assert {tuple(api.get(j["id"])["gpu_ids"]) for j in (a, b)} == {(0,), (1,)}
    # c gets a slot as soon as one frees, then is cancelled while it runs.
    wait_for(lambda: _state(api, c["id"]) == "running", timeout=180, what="c started")
    api.cancel(c["id"])
    for job in (a, b):
        assert wait_for(lambda j=job: _ended(api, j["id"]), timeout=120)["state"] == "succeeded"
    assert wait_for(lambda: _ended(api, c["id"]), timeout=60)["state"] == "cancelled"
    wait_for(lambda: _box_idle(api), timeout=10, what="GPUs freed")


def test_max_runtime_checkpoints_then_fails_as_timeout(api: Client, stack: Any) -> None:
    job = api.submit(tiny_spec("e2e-timeout", steps=100_000, max_runtime_s=15))
    final = wait_for(lambda: _ended(api, job["id"]), timeout=120, what="timed out")
    assert final["state"] == "failed" and final["error"]["type"] == "timeout"
    run_dir = stack.data_dir / "runs" / job["id"]
    events = run_dir / "events.jsonl"
    if events.exists() and '"type":"step"' in events.read_text():  # a loaded machine may not get that far
        assert any((run_dir / "checkpoints").iterdir()), "SIGTERM let the trainer checkpoint first"
    assert _job_processes(str(run_dir)) == [] and _starts(str(run_dir)) <= 1 and final["attempt"] == 1
    wait_for(lambda: _box_idle(api), timeout=10, what="GPUs freed")


def test_a_killed_rank_fails_the_job_cleanly(api: Client, stack: Any) -> None:
    job = api.submit(tiny_spec("e2e-rank-kill", steps=100_000))
    run_dir = str(stack.data_dir / "runs" / job["id"])
    wait_for(lambda: (api.get(job["id"])["progress"]["step"] or 0) >= 2, timeout=120, what="training")
    rank1 = next(p for p in _job_processes(run_dir) if _rank(p) == "1")
    rank1.kill()
    final = wait_for(lambda: _ended(api, job["id"]), timeout=60, what="failed")
    assert final["state"] == "failed" and final["error"]["type"] == "train_error"
    err = final["error"]
    # The trainer's launcher names the first rank it saw fail: the killed one (-9), or rank 0 when its
    # collective broke within the same poll.
    assert ("rank 1" in err["message"] and err["exit_code"] == -9) or (
        "rank 0" in err["message"] and err["exit_code"] not in (0, None)
    ), err
    assert _job_processes(run_dir) == [] and _starts(run_dir) == 1 and final["attempt"] == 1
    wait_for(lambda: _box_idle(api), timeout=10, what="GPUs freed")


def _starts(run_dir: str) -> int:
    """Trainer runs begun in a run dir (one `start` event each)."""
    events = Path(run_dir) / "events.jsonl"
    lines = events.read_text().splitlines() if events.exists() else []
    return sum(json.loads(line)["type"] == "start" for line in lines)


def _rank(p: psutil.Process) -> str | None:
    try:
        return p.environ().get("RANK")
    except psutil.Error:
        return None
