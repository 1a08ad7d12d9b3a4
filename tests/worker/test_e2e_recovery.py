"""A worker killed mid-run (SIGKILL): its ranks die with it, the lease expires, the job goes back to
the queue with attempt 2 and the next worker resumes it from its checkpoint. Real processes."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

from client.sdk import Client
from tests.helpers import wait_for
from tests.worker.conftest import start_stack, tiny_spec
from tests.worker.test_e2e import _job_processes

pytestmark = pytest.mark.slow
REDIS_URL = "redis://127.0.0.1:6379/14"
TERMINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One stack for both tests (each stops its worker and starts the next one): leases of 2 s renewed
    every 0.5 s, and 10 s for a stopped trainer to checkpoint."""
    s = start_stack(tmp_path_factory.mktemp("recovery"), REDIS_URL, heartbeat_s="0.5", lease_s="2", cancel_grace_s="10")
    yield s
    s.stop()


def _live_worker(stack: Any) -> None:
    """A worker runs: the one there is, or a new one in place of one a test stopped."""
    if not any(c.name == "worker" and c.proc.poll() is None for c in stack.children):
        stack.children[:] = [c for c in stack.children if c.name != "worker"]
        stack._spawn("worker", [sys.executable, "-m", "worker"])


@pytest.fixture
def api(stack: Any) -> Iterator[Client]:
    """A client of the shared stack. Each test starts with a live worker; what a failed test left
    unfinished is cancelled after it, so the next test finds the box idle."""
    _live_worker(stack)
    with Client(stack.url, stack.token()) as client:
        yield client
        _live_worker(stack)
        for job in client.list(limit=100)["data"]:
            if job["state"] not in TERMINAL:
                client.cancel(job["id"])
        wait_for(lambda: client.gpus()["in_use"] == 0, timeout=90, what="the box idle for the next test")


def test_a_killed_worker_loses_its_ranks_and_the_job_resumes(stack: Any, api: Client) -> None:
    job = api.submit(tiny_spec("e2e-lost", steps=60, checkpoint_every=5, max_runtime_s=600))
    wait_for(lambda: (api.get(job["id"])["progress"]["step"] or 0) >= 8, timeout=120, what="past a checkpoint")
    run_dir = str(stack.data_dir / "runs" / job["id"])
    ranks = [p for p in psutil.process_iter(["cmdline"]) if run_dir in " ".join(p.info["cmdline"] or [])]
    assert ranks

    worker = next(c for c in stack.children if c.name == "worker")
    os.kill(worker.proc.pid, signal.SIGKILL)
    worker.proc.wait()
    stack.children.remove(worker)
    _, alive = psutil.wait_procs(ranks, timeout=10)
    assert alive == [], "fate sharing: the ranks die with their worker"

    stack._spawn("worker", [sys.executable, "-m", "worker"])
    requeued = wait_for(lambda: (j := api.get(job["id"]))["attempt"] == 2 and j, timeout=60, what="attempt 2")
    assert requeued["state"] in ("queued", "starting", "running")
    final = wait_for(lambda: (j := api.get(job["id"]))["state"] in ("succeeded", "failed") and j, timeout=180)
    assert final["state"] == "succeeded", final["error"]
    steps = [m["step"] for m in api.all_metrics(job["id"])]
    assert steps == list(range(1, 61)), "the step count continued, no step lost or doubled"
    lines = (stack.data_dir / "runs" / job["id"] / "events.jsonl").read_text().splitlines()
    # The trainer wrote the steps after the checkpoint twice (attempt 2 trained them again); the
    # stream carries each step once, in order, as the history does (no step twice on the wire).
    written = [e["step"] for e in map(json.loads, lines) if e["type"] == "step"]
    streamed = [e.data["step"] for e in api.events(job["id"]) if e.type == "step"]
    assert len(written) >= 60 and set(written) == set(range(1, 61))
    assert streamed == list(range(1, 61))
    starts = [e for e in map(json.loads, lines) if e["type"] == "start"]
    assert len(starts) == 2 and starts[0]["resumed_from_step"] == 0
    assert starts[1]["resumed_from_step"] >= 5, "attempt 2 resumed from a checkpoint"
    assert final["attempt"] == 2 and _job_processes(run_dir) == []
    wait_for(lambda: api.gpus()["in_use"] == 0, timeout=10, what="slots freed")


def test_a_sigtermed_worker_requeues_its_job_and_the_next_worker_resumes_it(stack: Any, api: Client) -> None:
    """A redeploy: SIGTERM -> the trainer checkpoints, the job goes back to `queued` (not failed) with
    attempt 2, the worker exits; the next worker resumes from that checkpoint and the job succeeds."""
    # Enough steps that the job is still training when the SIGTERM lands: 40 (about 2 s on a quiet box)
    # could end between the API showing step 5 and the signal, and it then succeeded as attempt 1.
    steps = 200
    job = api.submit(tiny_spec("e2e-redeploy", steps=steps, checkpoint_every=0, max_runtime_s=600))
    wait_for(lambda: (api.get(job["id"])["progress"]["step"] or 0) >= 5, timeout=120, what="training")
    run_dir = str(stack.data_dir / "runs" / job["id"])
    worker = next(c for c in stack.children if c.name == "worker")
    os.kill(worker.proc.pid, signal.SIGTERM)
    assert worker.proc.wait(60) == 0, "the worker exits once its job is back in the queue"
    stack.children.remove(worker)
    requeued = api.get(job["id"])
    assert (requeued["state"], requeued["attempt"], requeued["error"]) == ("queued", 2, None)
    assert _job_processes(run_dir) == []
    lines = (stack.data_dir / "runs" / job["id"] / "events.jsonl").read_text().splitlines()
    saved = [e["step"] for e in map(json.loads, lines) if e["type"] == "checkpoint"]
    assert saved, "SIGTERM let the trainer checkpoint"

    stack._spawn("worker", [sys.executable, "-m", "worker"])
    final = wait_for(lambda: (j := api.get(job["id"]))["state"] in ("succeeded", "failed") and j, timeout=180)
    assert final["state"] == "succeeded" and final["attempt"] == 2, final["error"]
    lines = (stack.data_dir / "runs" / job["id"] / "events.jsonl").read_text().splitlines()
    starts = [e for e in map(json.loads, lines) if e["type"] == "start"]
    assert [s["resumed_from_step"] for s in starts] == [0, saved[-1]], "two runs; the second resumed"
    assert [m["step"] for m in api.all_metrics(job["id"])] == list(range(1, steps + 1))
    assert _job_processes(run_dir) == []
    wait_for(lambda: api.gpus()["in_use"] == 0, timeout=10, what="slots freed")
