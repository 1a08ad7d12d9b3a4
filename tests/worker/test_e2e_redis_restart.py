"""Redis restarted mid-run (its data gone): training goes on, the worker reconnects, the relay sends
what it held meanwhile, the job succeeds with its whole step history. Real processes."""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest
from redis import Redis

from client.sdk import Client
from client.stack import Stack, free_port
from tests.helpers import wait_for
from tests.worker.conftest import tiny_spec, write_corpus
from tests.worker.test_e2e import _job_processes

pytestmark = pytest.mark.slow


def test_training_survives_a_redis_restart(tmp_path) -> None:
    env = {"TRAINBOX_DATABASE_URL": f"sqlite:///{tmp_path / 'trainbox.db'}", "TRAINBOX_CPU_SLOTS": "2"}
    write_corpus(tmp_path / "data" / "corpus.jsonl")
    stack = Stack(data_dir=tmp_path, port=free_port(), extra_env=env)  # its own Redis, as `trainbox up`
    stack.start(on_step=lambda _: None)
    try:
        api = Client(stack.url, stack.token())
        job = api.submit(tiny_spec("e2e-redis", steps=150))
        wait_for(lambda: (api.get(job["id"])["progress"]["step"] or 0) >= 3, timeout=120, what="training")
        # An SSE client reads the first steps, then loses its connection as Redis dies.
        seen: list[Any] = []
        stream = api.events(job["id"])
        for event in stream:
            seen.append(event)
            if sum(e.type == "step" for e in seen) >= 3:
                break
        stream.close()

        redis_child = stack.child("redis")
        os.kill(redis_child.proc.pid, signal.SIGKILL)
        redis_child.proc.wait()
        step_while_down = api.get(job["id"])["progress"]["step"]
        wait_for(
            lambda: api.get(job["id"])["progress"]["step"] > step_while_down + 5,
            timeout=60,
            what="training goes on without Redis",
        )
        # What `trainbox up` does every half second: the dead Redis is started again, same port and password.
        wait_for(lambda: stack.supervise_once() or redis_child.restarts == 1, timeout=30, what="Redis restarted")
        final = wait_for(lambda: (j := api.get(job["id"]))["state"] in ("succeeded", "failed") and j, timeout=180)
        assert final["state"] == "succeeded", final["error"]
        assert [m["step"] for m in api.all_metrics(job["id"])] == list(range(1, 151))
        # The restarted Redis lost the stream; what the relay held while it was down arrived after it.
        r = Redis.from_url(stack.redis_url)
        entries = [f[b"data"] for _i, f in r.xrange(f"job:{job['id']}:events")]
        r.close()
        assert any(b'"type":"end"' in e for e in entries) and any(b'"state":"succeeded"' in e for e in entries)
        assert any(b'"step":150,' in e for e in entries)
        # The client resumes with Last-Event-ID (its step makes the resume exact): what Redis lost comes
        # from the DB, the rest from the new stream, every step once; a new client gets the whole history.
        resumed = [e for e in api.events(job["id"], last_event_id=seen[-1].id) if e.type == "step"]
        steps = [e.data["step"] for e in seen if e.type == "step"] + [e.data["step"] for e in resumed]
        assert steps == list(range(1, 151)), steps
        assert [e.data["step"] for e in api.events(job["id"]) if e.type == "step"] == list(range(1, 151))
        assert final["attempt"] == 1 and api.gpus()["in_use"] == 0
        assert _job_processes(str(tmp_path / "runs" / job["id"])) == []
    finally:
        stack.stop()
