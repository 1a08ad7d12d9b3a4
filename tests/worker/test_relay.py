"""The relay against real Redis: incremental tailing, ordered XADDs, batched log events, metric flushes."""

from __future__ import annotations

import json

from core import events as job_events
from worker.relay import FileTail, Relay


def _stream(redis, key):
    return [job_events.decode(fields) for _id, fields in redis.xrange(key)]


def test_file_tail_keeps_a_partial_line(tmp_path):
    path = tmp_path / "f"
    tail = FileTail(path)
    assert tail.read_lines() == []
    path.write_bytes(b"one\ntw")
    assert tail.read_lines() == ["one"]
    with path.open("ab") as f:
        f.write(b"o\nthree\n")
    assert tail.read_lines() == ["two", "three"]
    assert FileTail.from_end(path).read_lines() == []


def test_relay_publishes_events_logs_and_metrics_in_order(tmp_path, redis):
    stored: list[tuple[list, dict]] = []
    relay = Relay(
        run_dir=tmp_path,
        job_id="r1",
        redis=redis,
        sink=lambda rows, fields: stored.append((rows, fields)),
        flush_s=3600,
    )
    relay.publish([{"type": "state", "state": "running", "attempt": 1}])
    with (tmp_path / "events.jsonl").open("a") as f:
        f.write(json.dumps({"type": "start", "total_steps": 3, "time": 1.0}) + "\n")
        for step in (1, 2):
            f.write(json.dumps({"type": "step", "step": step, "loss": 1.0 / step, "time": 1.0 + step}) + "\n")
        f.write('{"type": "step", "step": 3')  # torn: the trainer is still writing it
    (tmp_path / "train.log").write_text("[rank 0] hello\n[rank 1] world\n")
    relay.pump()
    got = _stream(redis, "job:r1:events")
    assert [e["type"] for e in got] == ["state", "start", "step", "step", "log"]
    assert got[-1]["lines"] == ["[rank 0] hello", "[rank 1] world"]
    assert stored == [], "metrics wait for the flush interval"
    with (tmp_path / "events.jsonl").open("a") as f:
        f.write(', "loss": 0.3, "time": 4.0}\n')
        f.write(json.dumps({"type": "end", "status": "succeeded", "step": 3, "time": 5.0}) + "\n")
    relay.pump(final=True)
    got = _stream(redis, "job:r1:events")
    assert [e.get("step") for e in got if e["type"] == "step"] == [1, 2, 3]
    assert got[-1]["type"] == "end" and got[-1]["status"] == "succeeded"
    ((rows, fields),) = stored
    assert [r["step"] for r in rows] == [1, 2, 3] and fields == {"total_steps": 3}


def test_relay_holds_events_while_redis_is_away(tmp_path, redis):
    from redis import Redis

    dead = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    relay = Relay(run_dir=tmp_path, job_id="r2", redis=dead, sink=lambda *a: None)
    relay.publish([{"type": "state", "state": "running"}])
    assert len(relay._backlog) == 1
    relay.redis = redis
    relay.publish([{"type": "state", "state": "succeeded"}])
    assert [e["state"] for e in _stream(redis, "job:r2:events")] == ["running", "succeeded"]


def test_relay_retries_a_failed_metrics_write(tmp_path, redis):
    calls = []

    def flaky(rows, fields):
        calls.append(len(rows))
        if len(calls) == 1:
            raise RuntimeError("database is locked")

    relay = Relay(run_dir=tmp_path, job_id="r3", redis=redis, sink=flaky, flush_s=0)
    (tmp_path / "events.jsonl").write_text(json.dumps({"type": "step", "step": 1, "time": 1.0}) + "\n")
    relay.pump()
    assert relay.pending_metrics, "kept for the next flush"
    relay.pump()
    assert calls == [1, 1] and not relay.pending_metrics


def test_a_later_relay_resumes_where_the_last_one_published(tmp_path, redis):
    events = tmp_path / "events.jsonl"

    def relay() -> Relay:
        return Relay(run_dir=tmp_path, job_id="r4", redis=redis, sink=lambda *a: None, offsets_key="job:r4:relay")

    first = relay()
    events.write_text("".join(json.dumps({"type": "step", "step": s, "time": 1.0}) + "\n" for s in (1, 2)))
    first.pump()
    with events.open("a") as f:  # written after the last publish; then the worker dies
        f.write(json.dumps({"type": "step", "step": 3, "time": 1.0}) + "\n" + '{"type": "st')
    second = relay()
    second.pump()
    with events.open("a") as f:
        f.write('ep", "step": 4, "time": 1.0}\n')
    second.pump()
    assert [e["step"] for e in _stream(redis, "job:r4:events")] == [1, 2, 3, 4]


def test_drain_gives_up_after_its_timeout(tmp_path, redis):
    from redis import Redis

    dead = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.1)
    relay = Relay(run_dir=tmp_path, job_id="r5", redis=dead, sink=lambda *a: None)
    relay.publish([{"type": "state", "state": "succeeded"}])
    assert relay.drain(timeout_s=0.3, interval_s=0.1) is False
    relay.redis = redis
    assert relay.drain(timeout_s=1, interval_s=0.05) is True
    assert [e["state"] for e in _stream(redis, "job:r5:events")] == ["succeeded"]
