"""GET /jobs/{id}/events: SSE from the job's Redis stream, resumable with Last-Event-ID (`<stream id>:<step>`)."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import threading
import time

import httpx
import pytest
from redis import Redis

from api.app import create_app
from api.routers import events as events_route
from client.stack import redis_server_binary
from core import events, keys
from core.models import Job
from core.settings import Settings
from tests.api.conftest import serve, spec
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


def position(event_id: str) -> str:
    """The Redis stream id part of an event id (`<stream id>:<step>`)."""
    return event_id.split(":")[0]


def set_state(sessions, job_id, state):
    with sessions() as s:
        s.get(Job, job_id).state = state
        s.commit()


def posted_job(client, sessions, state: str = "running") -> tuple[str, dict[str, str]]:
    """A job submitted and set to `state`, and the caller's token header (for a client on a real socket)."""
    job_id = client.post("/jobs", json=spec()).json()["id"]
    set_state(sessions, job_id, state)
    return job_id, {"Authorization": client.headers["Authorization"]}


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
    assert [e[1] for e in got] == ["state", "step", "step", "step", "step", "step", "end"]
    assert got[0][2]["state"] == "queued"
    assert [e[0] for e in got[1:6]] == [f"{i}:{n}" for n, i in enumerate(ids, 1)]  # position and last step
    assert [e[2]["step"] for e in got[1:6]] == [1, 2, 3, 4, 5]
    assert got[-1][2] == {"type": "end", "state": "succeeded", "error": None}


def test_last_event_id_resumes_without_gaps_or_repeats(client, sessions, redis):
    job_id = client.post("/jobs", json=spec()).json()["id"]
    ids = steps(redis, job_id, 1, 11)
    set_state(sessions, job_id, "failed")
    got = read_all(client, job_id, **{"Last-Event-ID": f"{ids[3]}:4"})
    assert [position(e[0]) for e in got[:-1]] == ids[4:]
    assert [e[2]["step"] for e in got[:-1]] == list(range(5, 11))
    assert got[-1][1] == "end" and got[-1][2]["state"] == "failed"
    # Resuming from the last id gives only the end; the query parameter works the same.
    assert [e[1] for e in read_all(client, job_id, **{"Last-Event-ID": got[-2][0]})] == ["end"]
    with client.stream("GET", f"/jobs/{job_id}/events", params={"after": f"{ids[7]}:8"}) as r:
        assert [e[2].get("step") for e in parse(r.iter_lines())] == [9, 10, None]
    # A client that has the history (the dashboard) starts at 0-0 with its last step: only newer steps.
    with client.stream("GET", f"/jobs/{job_id}/events", params={"after": "0-0:7"}) as r:
        assert [(e[1], e[2].get("step")) for e in parse(r.iter_lines())] == [
            ("state", None),
            ("step", 8),
            ("step", 9),
            ("step", 10),
            ("end", None),
        ]


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
    for bad in ("abc", "1764270000123-0", "1-0:-1", f"1-0:{2**31}"):
        [err] = only_error(client.get(f"/jobs/{job_id}/events", headers={"Last-Event-ID": bad}), 422)
        assert err["loc"] == ["header", "Last-Event-ID"]
    only_error(client.get("/jobs/j0000000000000000/events"), 404)


@pytest.fixture
def live_server(settings, client):
    """The app served by uvicorn in a thread: a real socket, so events arrive while the job runs."""
    with serve(create_app(settings, dispatch=None)) as url:
        yield url


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
                    if stop_after and sum(1 for m in received if m[1] == "step") >= stop_after:
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
    metric_steps = [m[2]["step"] for m in received if m[1] == "step"]
    assert metric_steps == list(range(1, 9)), metric_steps
    assert received[-1][1] == "end"
    assert len({m[0] for m in received if m[1] != "end"}) == len([m for m in received if m[1] != "end"])
    assert ids_so_far <= {m[0] for m in received}


def test_steps_redis_lost_come_from_the_db(client, sessions, redis):
    """Redis lost the stream (a restart) after the client saw step 4; steps 8-10 reached the new stream
    (the relay held them): a resume gets 5-7 from the DB, then 8-10, each once, then the end."""
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

    got = read_all(client, job_id, **{"Last-Event-ID": f"{ids[3]}:4"})
    assert [(e[1], e[2].get("step")) for e in got] == [
        ("step", 5),
        ("step", 6),
        ("step", 7),
        ("state", None),
        ("step", 8),
        ("step", 9),
        ("step", 10),
        ("end", None),
    ]
    assert got[0][2]["loss"] == pytest.approx(0.2) and len({e[0] for e in got[:-1]}) == 7
    # A client that drops in the middle of the DB part resumes from a DB id; a new one gets it all.
    again = read_all(client, job_id, **{"Last-Event-ID": got[0][0]})
    assert [e[2].get("step") for e in again if e[1] == "step"] == [6, 7, 8, 9, 10]
    fresh = read_all(client, job_id)
    assert [e[2].get("step") for e in fresh if e[1] == "step"] == list(range(1, 11))
    # Nothing lost: the DB is not consulted.
    assert [e[2].get("step") for e in read_all(client, job_id, **{"Last-Event-ID": got[4][0]})] == [9, 10, None]


def test_a_resume_is_exact_by_step_when_redis_lost_events(client, sessions, redis):
    """The relay publishes after the trainer writes (and holds events while Redis is away), so a step's
    recorded time can precede the stream id of an earlier step: the event id's step makes the refill exact."""
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
    got = read_all(client, job_id, **{"Last-Event-ID": f"{ids[3]}:4"})
    assert [(e[1], e[2].get("step")) for e in got] == [("step", 5), ("step", 6), ("end", None)]


class Follower:
    """Follows a job's events over a real socket in a thread; keeps every line and whether it ended."""

    def __init__(self, url: str, job_id: str, token_headers: dict[str, str], **headers: str) -> None:
        self.lines: list[tuple[float, str]] = []
        self.ended = threading.Event()
        self.status: int | None = None
        self.error: Exception | None = None
        self._args = (f"{url}/jobs/{job_id}/events", {**token_headers, **headers})
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        url, headers = self._args
        try:
            with httpx.stream("GET", url, headers=headers, timeout=httpx.Timeout(10, read=60)) as r:
                self.status = r.status_code
                for line in r.iter_lines():
                    self.lines.append((time.monotonic(), line))
        except Exception as e:  # noqa: BLE001 - kept for the assertion message
            self.error = e
        finally:
            self.ended.set()

    def events(self) -> list[tuple[str, str, dict]]:
        return parse([line for _, line in self.lines])


def test_a_quiet_stream_outlives_the_redis_socket_timeout(client, settings, sessions, redis):
    """Production's block time and socket timeout: a follower of a queued job hears nothing for longer
    than the Redis client's socket timeout, keeps the stream (keep-alive comments), then gets the event."""
    if not settings.is_sqlite:
        pytest.skip("the stream's quiet does not depend on the database (run once)")
    production = settings.model_copy(update={"sse_block_ms": Settings.model_fields["sse_block_ms"].default})
    job_id = client.post("/jobs", json=spec()).json()["id"]
    app = create_app(production, dispatch=None)
    with serve(app) as url:
        pool = app.state.redis.connection_pool
        socket_timeout = pool.connection_class(**pool.connection_kwargs).socket_timeout  # as its connections get
        follower = Follower(url, job_id, {"Authorization": client.headers["Authorization"]})
        wait_for(lambda: follower.events(), timeout=10, what="the queued state event")
        quiet_since = time.monotonic()
        assert not follower.ended.wait(socket_timeout + 1), f"the quiet stream ended: {follower.error!r}"
        assert socket_timeout > production.sse_block_ms / 1000, "a poll's XREAD BLOCK must end before the timeout"
        comments = [line for t, line in follower.lines if t > quiet_since and line.startswith(":")]
        assert comments, "keep-alive comments while quiet"
        steps(redis, job_id, 1, 2)
        wait_for(lambda: any(e[1] == "step" for e in follower.events()), timeout=10, what="the step event")
        set_state(sessions, job_id, "succeeded")
        assert follower.ended.wait(15)
    assert [e[1] for e in follower.events()] == ["state", "step", "end"]


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server of this test's own on a free port: it can be killed and started again."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    argv = [redis_server_binary(), "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(tmp_path)]
    procs: list[subprocess.Popen] = []

    def start() -> Redis:
        procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ))
        r = Redis(port=port)
        wait_for(lambda: _pings(r), timeout=10, what="redis-server up")
        return r

    def stop() -> None:
        procs[-1].terminate()
        procs[-1].wait(10)

    yield f"redis://127.0.0.1:{port}/0", start, stop
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def _pings(r: Redis) -> bool:
    try:
        return bool(r.ping())
    except Exception:  # noqa: BLE001 - not up yet
        return False


def test_a_stream_after_a_redis_restart_reconnects_instead_of_ending(client, settings, sessions, own_redis):
    """A Redis restart closes the API's idle pooled connections. The next stream's first command must go
    out again on a new connection: it ended the stream at once (the client had nothing to resume from)."""
    if not settings.is_sqlite:
        pytest.skip("the stream's Redis handling does not depend on the database (run once)")
    redis_url, start_redis, stop_redis = own_redis
    r = start_redis()
    job_id, auth = posted_job(client, sessions, "succeeded")
    app = create_app(settings.model_copy(update={"redis_url": redis_url}), dispatch=None)
    with serve(app) as url:
        steps(r, job_id, 1, 3)
        first = Follower(url, job_id, auth)
        assert first.ended.wait(15) and [e[1] for e in first.events()] == ["step", "step", "end"]
        wait_for(lambda: not app.state.fanout.readers, timeout=10, what="the job's reader gone")
        assert app.state.redis.connection_pool._available_connections, "idle pooled connections to go stale"
        stop_redis()
        r = start_redis()  # empty: the stream is lost
        steps(r, job_id, 3, 4)
        resumed = Follower(url, job_id, auth, **{"Last-Event-ID": first.events()[-1][0]})
        assert resumed.ended.wait(15)
    assert [(e[1], e[2].get("step")) for e in resumed.events()] == [("step", 3), ("end", None)]


def test_the_sdk_gets_the_tail_and_end_of_a_job_that_ended_while_its_stream_was_cut(
    client, settings, sessions, own_redis
):
    """Redis restarted as the job ended: the server ends the stream without the job's end. The SDK saw a
    finished job and stopped there, without the last step and the end; one more resume brings both."""
    from client.sdk import Client
    from core.models import JobMetric

    if not settings.is_sqlite:
        pytest.skip("the SDK's resume does not depend on the database (run once)")
    redis_url, start_redis, stop_redis = own_redis
    r = start_redis()
    job_id, auth = posted_job(client, sessions)
    with serve(create_app(settings.model_copy(update={"redis_url": redis_url}), dispatch=None)) as url:
        sdk = Client(url, token=auth["Authorization"].removeprefix("Bearer "))
        got: list = []

        def follow() -> None:  # the pause before a resume (retry_s) outlasts the Redis restart below
            for event in sdk.events(job_id, retry_s=3):
                got.append(event)

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        for i in (1, 2, 3):  # what the worker records of each step, as the relay publishes it
            with sessions() as s:
                s.add(JobMetric(job_id=job_id, attempt=1, step=i, loss=1.0 / i, time=time.time()))
                s.commit()
            if i < 3:
                steps(r, job_id, i, i + 1)
        wait_for(lambda: len(got) == 2, timeout=10, what="steps 1 and 2 at the SDK")
        set_state(sessions, job_id, "succeeded")  # step 3 and the end never reach this Redis
        stop_redis()
        start_redis()  # empty
        follower.join(30)
        assert not follower.is_alive()
    assert [(e.type, e.data.get("step")) for e in got] == [("step", 1), ("step", 2), ("step", 3), ("end", None)]


def test_a_redis_failure_ends_the_stream_with_one_line_and_the_resume_works(
    client, settings, sessions, own_redis, caplog, monkeypatch
):
    if not settings.is_sqlite:
        pytest.skip("the stream's Redis handling does not depend on the database (run once)")
    # Another test's Redis error may have been the last line: start the log's rate limit afresh.
    monkeypatch.setattr(events_route, "_warned", {"at": 0.0, "quiet": 0}, raising=False)
    caplog.set_level(logging.INFO)
    redis_url, start_redis, stop_redis = own_redis
    r = start_redis()
    job_id, auth = posted_job(client, sessions)
    with serve(create_app(settings.model_copy(update={"redis_url": redis_url}), dispatch=None)) as url:
        steps(r, job_id, 1, 3)
        followers = [Follower(url, job_id, auth) for _ in range(3)]
        for f in followers:
            wait_for(lambda f=f: len(f.events()) == 2, timeout=10, what="steps 1 and 2")
        stop_redis()
        for f in followers:
            assert f.ended.wait(20), "a stream whose Redis died must end"
            assert f.error is None, f"the stream ended cleanly, not with {f.error!r}"
        last_id = followers[0].events()[-1][0]
        r = start_redis()
        steps(r, job_id, 3, 4)
        set_state(sessions, job_id, "succeeded")
        resumed = Follower(url, job_id, auth, **{"Last-Event-ID": last_id})
        assert resumed.ended.wait(15)
    assert [(e[1], e[2].get("step")) for e in resumed.events()] == [("step", 3), ("end", None)]
    warnings = [rec for rec in caplog.records if rec.name == events_route.log.name]
    assert len(warnings) == 1 and "Redis" in warnings[0].getMessage(), [w.getMessage() for w in warnings]
    assert not [rec for rec in caplog.records if rec.exc_info or rec.levelno >= logging.ERROR], "no tracebacks"
