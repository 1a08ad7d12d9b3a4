"""GET /jobs/{id}/events: SSE from the job's Redis stream, resumable with Last-Event-ID."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
import uvicorn

from api.app import create_app
from core import events
from core.models import Job
from tests.api.conftest import spec
from tests.api.test_jobs import only_error
from tests.helpers import wait_for


def parse(lines):
    """(id, event, data) per SSE message."""
    out, eid, name, data = [], None, None, []
    for line in lines:
        if line == "":
            if data:
                out.append((eid, name, json.loads("\n".join(data))))
            eid, name, data = None, None, []
        elif not line.startswith(":"):
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "id":
                eid = value
            elif field == "event":
                name = value
            elif field == "data":
                data.append(value)
    return out


def set_state(sessions, job_id, state):
    with sessions() as s:
        s.get(Job, job_id).state = state
        s.commit()


def steps(redis, job_id, start, stop):
    return [
        events.publish(
            redis, job_id, {"type": "step", "step": i, "loss": 3.0 - i / 10, "time": time.time()}, maxlen=1000
        )
        for i in range(start, stop)
    ]


def read_all(client, job_id, **headers):
    with client.stream("GET", f"/jobs/{job_id}/events", headers=headers) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return parse(r.iter_lines())


def test_terminal_job_streams_history_then_end(client, sessions, redis):
    job_id = client.post("/jobs", json=spec()).json()["id"]  # the API publishes state=queued
    ids = steps(redis, job_id, 1, 6)
    set_state(sessions, job_id, "succeeded")
    got = read_all(client, job_id)
    assert [e[1] for e in got] == ["state", "metric", "metric", "metric", "metric", "metric", "end"]
    assert got[0][2]["state"] == "queued"
    assert [e[0] for e in got[1:6]] == ids
    assert [e[2]["step"] for e in got[1:6]] == [1, 2, 3, 4, 5]
    assert got[-1][2] == {"type": "end", "state": "succeeded", "error": None}


def test_last_event_id_resumes_without_gaps_or_repeats(client, sessions, redis):
    job_id = client.post("/jobs", json=spec()).json()["id"]
    ids = steps(redis, job_id, 1, 11)
    set_state(sessions, job_id, "failed")
    got = read_all(client, job_id, **{"Last-Event-ID": ids[3]})
    assert [e[0] for e in got[:-1]] == ids[4:]
    assert [e[2]["step"] for e in got[:-1]] == list(range(5, 11))
    assert got[-1][1] == "end" and got[-1][2]["state"] == "failed"
    # Resuming from the last id gives only the end; the query parameter works for EventSource too.
    assert [e[1] for e in read_all(client, job_id, **{"Last-Event-ID": ids[-1]})] == ["end"]
    with client.stream("GET", f"/jobs/{job_id}/events", params={"after": ids[7]}) as r:
        assert [e[2].get("step") for e in parse(r.iter_lines())] == [9, 10, None]


def test_cancelled_queued_job_stream_ends(client):
    job_id = client.post("/jobs", json=spec()).json()["id"]
    client.post(f"/jobs/{job_id}/cancel")
    got = read_all(client, job_id)
    assert [(e[1], e[2].get("state")) for e in got] == [
        ("state", "queued"),
        ("state", "cancelled"),
        ("end", "cancelled"),
    ]


def test_event_errors(client):
    job_id = client.post("/jobs", json=spec()).json()["id"]
    [err] = only_error(client.get(f"/jobs/{job_id}/events", headers={"Last-Event-ID": "abc"}), 422)
    assert err["loc"] == ["header", "Last-Event-ID"]
    only_error(client.get("/jobs/j0000000000000000/events"), 404)


@pytest.fixture
def live_server(settings, client):
    """The app served by uvicorn in a thread: a real socket, so events arrive while the job runs."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    app = create_app(settings, dispatch=None)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_for(lambda: server.started, timeout=10, what="uvicorn start")
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(10)
    app.state.engine.dispose()


def test_live_stream_delivers_each_event_once_across_a_reconnect(client, sessions, redis, live_server):
    job_id = client.post("/jobs", json=spec()).json()["id"]
    set_state(sessions, job_id, "running")
    received: list[tuple[str, str, dict]] = []

    def follow(last_id=None, stop_after=None):
        headers = {"Last-Event-ID": last_id} if last_id else {}
        headers["Authorization"] = client.headers["Authorization"]
        with httpx.stream("GET", f"{live_server}/jobs/{job_id}/events", headers=headers, timeout=10) as r:
            lines = []
            for line in r.iter_lines():
                lines.append(line)
                if line == "":
                    msgs = parse(lines)
                    lines = []
                    received.extend(msgs)
                    if stop_after and sum(1 for m in received if m[1] == "metric") >= stop_after:
                        return  # drop the connection mid-run

    t = threading.Thread(target=follow, kwargs={"stop_after": 4})
    t.start()
    wait_for(lambda: received, timeout=5, what="first event")  # the queued state event
    for i in range(1, 9):
        steps(redis, job_id, i, i + 1)
        time.sleep(0.02)
    t.join(10)
    assert not t.is_alive()
    last = received[-1][0]
    ids_so_far = {m[0] for m in received}
    set_state(sessions, job_id, "succeeded")
    follow(last_id=last)
    metric_steps = [m[2]["step"] for m in received if m[1] == "metric"]
    assert metric_steps == list(range(1, 9)), metric_steps
    assert received[-1][1] == "end"
    assert len({m[0] for m in received if m[1] != "end"}) == len([m for m in received if m[1] != "end"])
    assert ids_so_far <= {m[0] for m in received}


def test_steps_redis_lost_come_from_the_db(client, sessions, redis):
    """Redis lost the stream (a restart) after the client saw step 4; steps 8-10 reached the new stream
    (the relay held them): a resume gets 5-7 from the DB, then 8-10, each once, then the end."""
    from core import keys
    from core.models import JobMetric

    job_id = client.post("/jobs", json=spec()).json()["id"]
    ids = []
    for i in range(1, 11):
        t = time.time()
        ids.append(events.publish(redis, job_id, {"type": "step", "step": i, "loss": 1.0 / i, "time": t}, maxlen=1000))
        with sessions() as s:
            s.add(JobMetric(job_id=job_id, attempt=1, step=i, loss=1.0 / i, time=t))
            s.commit()
        time.sleep(0.005)
    redis.delete(keys.job_events(job_id))  # the restarted Redis has none of it ...
    redis.xadd(keys.job_events(job_id), events.encode({"type": "state", "state": "running"}))
    for i in range(8, 11):  # ... then gets what the relay held
        events.publish(redis, job_id, {"type": "step", "step": i, "loss": 1.0 / i, "time": time.time()}, maxlen=1000)
    set_state(sessions, job_id, "succeeded")

    got = read_all(client, job_id, **{"Last-Event-ID": ids[3]})
    assert [(e[1], e[2].get("step")) for e in got] == [
        ("metric", 5), ("metric", 6), ("metric", 7), ("state", None), ("metric", 8), ("metric", 9), ("metric", 10),
        ("end", None),
    ]  # fmt: skip
    assert got[0][2]["loss"] == pytest.approx(0.2) and len({e[0] for e in got[:-1]}) == 7
    # A client that drops in the middle of the DB part resumes from a DB id; a new one gets it all.
    again = read_all(client, job_id, **{"Last-Event-ID": got[0][0]})
    assert [e[2].get("step") for e in again if e[1] == "metric"] == [6, 7, 8, 9, 10]
    fresh = read_all(client, job_id)
    assert [e[2].get("step") for e in fresh if e[1] == "metric"] == list(range(1, 11))
    # Nothing lost: the DB is not consulted.
    assert [e[2].get("step") for e in read_all(client, job_id, **{"Last-Event-ID": got[4][0]})] == [9, 10, None]


def test_last_step_makes_a_resume_exact_when_redis_lost_events(client, sessions, redis):
    """The relay publishes after the trainer writes (and holds events while Redis is away), so a step's
    recorded time can precede the stream id of an earlier step: with Last-Step the refill is by step."""
    from core import keys
    from core.models import JobMetric

    job_id = client.post("/jobs", json=spec()).json()["id"]
    written = time.time() - 5  # the trainer wrote all six before the relay got them to Redis
    ids = []
    for i in range(1, 7):
        ids.append(events.publish(redis, job_id, {"type": "step", "step": i, "time": written + i / 1000}, maxlen=100))
        with sessions() as s:
            s.add(JobMetric(job_id=job_id, attempt=1, step=i, loss=1.0, time=written + i / 1000))
            s.commit()
    redis.delete(keys.job_events(job_id))  # a restarted Redis lost them all
    set_state(sessions, job_id, "succeeded")
    got = read_all(client, job_id, **{"Last-Event-ID": ids[3], "Last-Step": "4"})
    assert [(e[1], e[2].get("step")) for e in got] == [("metric", 5), ("metric", 6), ("end", None)]
    [err] = only_error(client.get(f"/jobs/{job_id}/events", headers={"Last-Step": "-1"}), 422)
    assert err["loc"] == ["header", "last-step"]
