"""Two boxes on this machine (two workers with their own box names, queues and CPU slots) and priorities,
with real processes: a job goes to a box with room for all of it and never spans two; with every box
full, a high-priority job submitted after a low one is placed first, and the big job at the head is not
passed by the small one behind it while only scattered slots are free."""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from client.sdk import Client
from tests.helpers import wait_for
from tests.worker.conftest import start_stack, tiny_spec
from tests.worker.test_e2e import _ended, _job_processes

pytestmark = pytest.mark.slow
REDIS_URL = "redis://127.0.0.1:6379/15"
BOX_A, BOX_B = "e2e-a", "e2e-b"  # 1 slot, 2 slots


def _holders(api: Client) -> dict[str, dict[int, str | None]]:
    """box -> {slot: the id of the job holding it}."""
    return {b["name"]: {g["index"]: (g["job"] or {}).get("id") for g in b["gpus"]} for b in api.gpus()["data"]}


def _heartbeat(api: Client, box: str) -> datetime:
    return next(datetime.fromisoformat(b["heartbeat_at"]) for b in api.gpus()["data"] if b["name"] == box)


def _starts(run_dir: Path) -> int:
    """How many runs the trainer began (one `start` event each)."""
    events = run_dir / "events.jsonl"
    if not events.exists():
        return 0
    return sum(json.loads(line)["type"] == "start" for line in events.read_text().splitlines())


def test_two_boxes_and_priorities(tmp_path: Path) -> None:
    stack = start_stack(tmp_path, REDIS_URL, box_name=BOX_A, cpu_slots="1", cancel_grace_s="5")
    try:
        # Same settings but the box: two boxes on one host.
        stack.extra_env.update(TRAINBOX_BOX_NAME=BOX_B, TRAINBOX_CPU_SLOTS="2")
        stack._spawn("worker-b", [sys.executable, "-m", "worker"], stop_timeout_s=40.0)
        api = Client(stack.url, stack.token())
        wait_for(lambda: set(_holders(api)) == {BOX_A, BOX_B}, timeout=60, what="both boxes registered")
        assert {b: len(s) for b, s in _holders(api).items()} == {BOX_A: 1, BOX_B: 2}
        _scenario(api, stack)
    finally:
        stack.stop()


def _scenario(api: Client, stack: Any) -> None:
    # A 2-slot job fits only box B; a 1-slot job then goes to A. Both boxes are full.
    big = api.submit(tiny_spec("two-slots", gpus=2, steps=100_000))
    wait_for(lambda: _holders(api)[BOX_B] == {0: big["id"], 1: big["id"]}, timeout=30, what="big on B")
    small = api.submit(tiny_spec("one-slot", gpus=1, steps=100_000))
    wait_for(lambda: _holders(api)[BOX_A] == {0: small["id"]}, timeout=30, what="small on A")
    for job in (big, small):
        wait_for(lambda j=job: (api.get(j["id"])["progress"]["step"] or 0) >= 1, timeout=120, what="training")

    # Queue a low-priority 1-slot job, then a high-priority 2-slot one: the high one heads the queue.
    low = api.submit(tiny_spec("low", gpus=1, steps=3))
    high = api.submit(tiny_spec("high", gpus=2, steps=3, priority=5))
    assert (api.get(high["id"])["queue_position"], api.get(low["id"])["queue_position"]) == (1, 2)

    # A's slot frees: one slot on A and none on B cannot hold `high` (no spanning), and `low` may not
    # pass it. Three sweeps later both still wait.
    api.cancel(small["id"])
    assert wait_for(lambda: _ended(api, small["id"]), timeout=60)["state"] == "cancelled"
    wait_for(lambda: _holders(api)[BOX_A] == {0: None}, timeout=10, what="A free")
    freed_at = _heartbeat(api, BOX_A)
    wait_for(lambda: (_heartbeat(api, BOX_A) - freed_at).total_seconds() >= 2.5, timeout=15, what="3 more sweeps")
    assert [api.get(j["id"])["state"] for j in (high, low)] == ["queued", "queued"]

    # B frees: `high` gets both of B's slots, then `low` takes A's.
    api.cancel(big["id"])
    wait_for(lambda: api.get(low["id"])["state"] != "queued", timeout=60, what="low placed")
    assert api.get(high["id"])["state"] != "queued", "the high-priority job was placed first"
    for job in (big, high, low):
        assert wait_for(lambda j=job: _ended(api, j["id"]), timeout=180)["state"] in ("cancelled", "succeeded")
    final = {j["name"]: api.get(j["id"]) for j in (big, small, high, low)}
    assert final["high"]["state"] == final["low"]["state"] == "succeeded"
    assert final["high"]["gpu_ids"] == [0, 1] and final["low"]["gpu_ids"] == [0], "high on B, low on A"

    runs = stack.data_dir / "runs"
    assert {n: _starts(runs / j["id"]) for n, j in final.items()} == {
        "two-slots": 1,
        "one-slot": 1,
        "high": 1,
        "low": 1,
    }
    assert all(j["attempt"] == 1 for j in final.values())
    assert all(_job_processes(str(runs / j["id"])) == [] for j in final.values())
    wait_for(lambda: api.gpus()["in_use"] == 0, timeout=10, what="every slot free")
