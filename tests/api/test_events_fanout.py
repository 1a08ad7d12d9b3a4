"""GET /jobs/{id}/events through the job's shared reader (api/fanout.py): one XREAD per batch of events,
not one per follower; late, fresh and slow followers get every event once; the reader goes with its
last follower. Real Redis (a server of the test's own where its command counts matter) and the real app."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest
from redis import Redis

from api import fanout
from api.app import create_app
from core import events, keys
from tests.api import test_events
from tests.api.test_events import Follower, parse, posted_job, set_state, steps
from tests.helpers import serve, wait_for

live_server, own_redis = test_events.live_server, test_events.own_redis  # fixtures


def xread_calls(r: Redis) -> int:
    """XREADs the server has run (one that blocked counts once it returns)."""
    return int(r.info("commandstats").get("cmdstat_xread", {}).get("calls", 0))


def readers(app) -> dict:
    """The app's job readers (its fan-out is made by the first stream)."""
    made = getattr(app.state, "fanout", None)
    return made.readers if made else {}


def step_events(start: int, stop: int, **extra) -> list[dict]:
    return [{"type": "step", "step": i, "loss": 1.0 / i, "time": time.time(), **extra} for i in range(start, stop)]


def received(follower: Follower) -> list[tuple[str, str, int | None]]:
    return [(e[0], e[1], e[2].get("step")) for e in follower.events()]


def start_followers(url: str, job_id: str, auth: dict[str, str], n: int) -> list[Follower]:
    """n followers of the job, each past its first event; one at a time: a user's requests in flight are
    capped (429)."""
    followers: list[Follower] = []
    for _ in range(n):
        followers.append(Follower(url, job_id, auth))
        wait_for(lambda: followers[-1].events(), timeout=10, what="a follower's first event")
    return followers


def test_followers_of_a_job_share_one_xread_per_batch(client, settings, sessions, own_redis):
    if not settings.is_sqlite:
        pytest.skip("the fan-out does not depend on the database (run once)")
    redis_url, start_redis, _stop = own_redis
    r = start_redis()
    job_id, auth = posted_job(client, sessions)
    events.publish(r, job_id, {"type": "state", "state": "running"}, maxlen=1000)
    # Production's block time: a quiet reader's XREAD BLOCK does not end (and count) within the test.
    app = create_app(settings.model_copy(update={"redis_url": redis_url, "sse_block_ms": 5000}), dispatch=None)
    n, batches, size = 20, 10, 5
    with serve(app) as url:
        followers = start_followers(url, job_id, auth, n)
        before = xread_calls(r)
        for b in range(batches):
            # As the relay publishes: the batch in one pipeline.
            events.publish_many(r, job_id, step_events(1 + b * size, 1 + (b + 1) * size), maxlen=10000)
            want = 1 + (b + 1) * size
            wait_for(lambda w=want: all(len(f.events()) >= w for f in followers), timeout=20, what=f"batch {b}")
        calls = xread_calls(r) - before
        set_state(sessions, job_id, "succeeded")
        events.publish(r, job_id, {"type": "state", "state": "succeeded"}, maxlen=1000)
        for f in followers:
            assert f.ended.wait(20), "the stream ends once the job is terminal"
    first = received(followers[0])
    assert [s for _i, name, s in first if name == "step"] == list(range(1, batches * size + 1))
    assert [name for _i, name, _s in first][-2:] == ["state", "end"]
    assert len({i for i, _n, _s in first[:-1]}) == len(first) - 1, "no id twice (the end repeats the last)"
    for f in followers:
        assert f.error is None and received(f) == first
    # One reader for all: a few XREADs per batch (today two), not some per follower and batch (400 here
    # when each stream read for itself).
    assert calls <= 3 * batches + 2, f"{calls} XREADs counted for {batches} batches and {n} followers"


def test_a_quiet_jobs_followers_share_its_state_reads(client, settings, sessions):
    """A quiet stream's state is read once per block time for all the job's followers, not once per follower."""
    if not settings.is_sqlite:
        pytest.skip("the fan-out does not depend on the database (run once)")
    from sqlalchemy import event

    job_id, auth = posted_job(client, sessions)
    app = create_app(settings, dispatch=None)
    reads = []

    def count(_conn, _cursor, statement, *_args) -> None:
        if "FROM jobs" in statement:
            reads.append(statement)

    event.listen(app.state.engine, "before_cursor_execute", count)
    n, quiet_s = 10, 1.0
    with serve(app) as url:
        followers = start_followers(url, job_id, auth, n)
        before = len(reads)
        time.sleep(quiet_s)  # the quiet being measured
        during = len(reads) - before
        set_state(sessions, job_id, "succeeded")
        for f in followers:
            assert f.ended.wait(15)
    assert during <= quiet_s / (settings.sse_block_ms / 1000) + 3, f"{during} state reads for {n} quiet followers"


def test_late_and_fresh_followers_join_a_running_reader(client, sessions, redis, live_server):
    job_id, auth = posted_job(client, sessions)  # the API publishes state=queued
    early = Follower(live_server, job_id, auth)
    wait_for(lambda: early.events(), timeout=10, what="the queued state event")
    ids = steps(redis, job_id, 1, 11)
    wait_for(lambda: len(early.events()) == 11, timeout=10, what="steps 1 to 10")
    late = Follower(live_server, job_id, auth, **{"Last-Event-ID": f"{ids[3]}:4"})
    fresh = Follower(live_server, job_id, auth)
    wait_for(lambda: len(late.events()) == 6 and len(fresh.events()) == 11, timeout=10, what="the catch-up")
    steps(redis, job_id, 11, 13)
    set_state(sessions, job_id, "succeeded")
    events.publish(redis, job_id, {"type": "state", "state": "succeeded"}, maxlen=1000)
    for f in (early, late, fresh):
        assert f.ended.wait(15) and f.error is None
    all_events = received(early)
    assert [s for _i, name, s in all_events if name == "step"] == list(range(1, 13))
    assert [name for _i, name, _s in all_events][-2:] == ["state", "end"]
    assert received(fresh) == all_events
    assert received(late) == all_events[5:], "exactly the events after its Last-Event-ID"


def test_a_made_up_position_does_not_hide_events_from_the_others(client, settings, sessions, redis):
    """A client that resumes past the stream's end starts the job's reader: it starts at the stream's end."""
    job_id, auth = posted_job(client, sessions)
    app = create_app(settings, dispatch=None)
    with serve(app) as url:
        future = Follower(url, job_id, auth, **{"Last-Event-ID": f"{2**63}-0:0"})
        reader = wait_for(lambda: readers(app).get(job_id), timeout=10, what="the reader it starts")
        now = Follower(url, job_id, auth, **{"Last-Event-ID": f"{steps(redis, job_id, 1, 2)[0]}:1"})
        wait_for(lambda: reader.followers == 2, timeout=10, what="the other follower on the same reader")
        steps(redis, job_id, 2, 4)
        wait_for(lambda: len(now.events()) == 2, timeout=10, what="steps 2 and 3")
        set_state(sessions, job_id, "succeeded")
        assert now.ended.wait(15) and future.ended.wait(15)
    assert [(e[1], e[2].get("step")) for e in now.events()] == [("step", 2), ("step", 3), ("end", None)]
    assert [e[1] for e in future.events()] == ["end"]


def test_a_made_up_position_on_an_empty_stream_does_not_take_the_reader(client, settings, sessions, redis):
    """With no stream at all (Redis lost it), a client resuming past its end starts the reader at the
    beginning: the job's other followers still share it."""
    job_id, auth = posted_job(client, sessions)
    redis.delete(keys.job_events(job_id))
    app = create_app(settings, dispatch=None)
    with serve(app) as url:
        future = Follower(url, job_id, auth, **{"Last-Event-ID": f"{2**63}-0:0"})
        reader = wait_for(lambda: readers(app).get(job_id), timeout=10, what="the reader it starts")
        fresh = Follower(url, job_id, auth)
        wait_for(lambda: reader.followers == 2, timeout=10, what="the fresh follower on the same reader")
        steps(redis, job_id, 1, 3)
        wait_for(lambda: len(fresh.events()) == 2, timeout=10, what="steps 1 and 2")
        set_state(sessions, job_id, "succeeded")
        assert fresh.ended.wait(15) and future.ended.wait(15)
    assert [(e[1], e[2].get("step")) for e in fresh.events()] == [("step", 1), ("step", 2), ("end", None)]


def test_the_readers_buffer_is_bounded_in_bytes(client, settings, sessions, redis, monkeypatch):
    """Large events (a log event carries up to 200 lines) are kept up to BUFFER_BYTES, not BUFFER of them."""
    if not settings.is_sqlite:
        pytest.skip("the fan-out does not depend on the database (run once)")
    cap = 2_000_000
    monkeypatch.setattr(fanout, "BUFFER_BYTES", cap)
    job_id, auth = posted_job(client, sessions)
    app = create_app(settings, dispatch=None)
    with serve(app) as url:
        follower = Follower(url, job_id, auth)
        reader = wait_for(lambda: readers(app).get(job_id), timeout=10, what="the job's reader")
        wait_for(lambda: follower.events(), timeout=10, what="the queued state event")
        events.publish_many(redis, job_id, step_events(1, 101, pad="x" * 100_000), maxlen=10000)
        wait_for(lambda: count_events(follower) == 101, timeout=30, what="every step")
        assert reader.bytes <= cap and len(reader.buffer) <= cap // 200_000, (reader.bytes, len(reader.buffer))
        set_state(sessions, job_id, "succeeded")
        events.publish(redis, job_id, {"type": "state", "state": "succeeded"}, maxlen=1000)
        assert follower.ended.wait(15)
    assert [s for _i, name, s in received(follower) if name == "step"] == list(range(1, 101))


class SlowFollower(threading.Thread):
    """Opens the stream, reads nothing until `go` is set, then reads it to its end."""

    def __init__(self, url: str, job_id: str, headers: dict[str, str]) -> None:
        super().__init__(daemon=True)
        self.url, self.headers = f"{url}/jobs/{job_id}/events", headers
        self.go, self.connected, self.lines = threading.Event(), threading.Event(), []
        self.start()

    def run(self) -> None:
        with httpx.stream("GET", self.url, headers=self.headers, timeout=httpx.Timeout(10, read=60)) as r:
            self.connected.set()
            self.go.wait(60)
            self.lines.extend(r.iter_lines())


def count_events(follower: Follower) -> int:
    return sum(1 for _t, line in follower.lines if line.startswith("event:"))


def test_a_follower_behind_the_buffer_reads_for_itself_and_misses_nothing(
    client, settings, sessions, redis, monkeypatch
):
    if not settings.is_sqlite:
        pytest.skip("the fan-out does not depend on the database (run once)")
    buffer, batch = 60, 50  # a follower that keeps up never falls behind (a batch fits in the buffer)
    monkeypatch.setattr(fanout, "BUFFER", buffer)
    job_id, auth = posted_job(client, sessions)
    # More than the kernel can hold for a client that does not read (both socket buffers at their
    # largest): the slow follower's sends block while the reader moves on past its buffer.
    pad, count = "x" * 120_000, 400
    socket_max = sum(int(Path(f"/proc/sys/net/ipv4/tcp_{m}").read_text().split()[2]) for m in ("rmem", "wmem"))
    assert (count - buffer) * len(pad) > socket_max + 1_000_000
    with serve(create_app(settings, dispatch=None)) as url:
        fast = Follower(url, job_id, auth)
        slow = SlowFollower(url, job_id, auth)
        assert slow.connected.wait(10)
        wait_for(lambda: fast.events(), timeout=10, what="the queued state event")
        for start in range(1, count + 1, batch):
            events.publish_many(redis, job_id, step_events(start, start + batch, pad=pad), maxlen=10000)
            n = start + batch  # the state event and the steps so far
            wait_for(lambda n=n: count_events(fast) == n, timeout=30, what="the batch at the fast follower")
        set_state(sessions, job_id, "succeeded")
        events.publish(redis, job_id, {"type": "state", "state": "succeeded"}, maxlen=1000)
        assert fast.ended.wait(15)
        slow.go.set()
        slow.join(60)
        assert not slow.is_alive()
    got = [(e[0], e[1], e[2].get("step")) for e in parse(slow.lines)]
    assert [s for _i, name, s in got if name == "step"] == list(range(1, count + 1))
    assert got == received(fast)


def test_the_reader_goes_with_its_last_follower(client, settings, sessions, redis):
    job_id, auth = posted_job(client, sessions)
    app = create_app(settings, dispatch=None)

    def follow_one_step(**headers: str) -> None:
        with httpx.stream("GET", f"{url}/jobs/{job_id}/events", headers={**auth, **headers}, timeout=10) as r:
            lines = []
            for line in r.iter_lines():
                lines.append(line)
                if any(e[1] == "step" for e in parse(lines)):
                    return  # the client leaves

    with serve(app) as url:
        threads = [threading.Thread(target=follow_one_step) for _ in range(3)]
        for t in threads:
            t.start()
        reader = wait_for(lambda: readers(app).get(job_id), timeout=10, what="the job's reader")
        wait_for(lambda: reader.followers == 3, timeout=10, what="three followers")
        ids = steps(redis, job_id, 1, 2)
        for t in threads:
            t.join(10)
        wait_for(lambda: reader.task.done(), timeout=10, what="the reader's end")
        assert not readers(app)
        # The next follower starts a new reader.
        threads = [threading.Thread(target=follow_one_step, kwargs={"Last-Event-ID": f"{ids[0]}:1"})]
        threads[0].start()
        wait_for(lambda: readers(app).get(job_id) not in (None, reader), timeout=10, what="a new reader")
        steps(redis, job_id, 2, 3)
        threads[0].join(10)
        wait_for(lambda: not readers(app), timeout=10, what="no reader")


def test_a_redis_restart_while_a_follower_catches_up_ends_its_stream_without_a_gap(
    client, settings, sessions, own_redis
):
    """A follower reading for itself (catching up) when Redis restarts and loses the stream: its next read
    must fail and end the stream (the client resumes; the DB refills the steps), not go on from the new,
    empty stream as if the lost steps had been sent."""
    if not settings.is_sqlite:
        pytest.skip("the stream's Redis handling does not depend on the database (run once)")
    redis_url, start_redis, stop_redis = own_redis
    r = start_redis()
    job_id, auth = posted_job(client, sessions)
    pad, count = "x" * 120_000, 400  # more than both socket buffers hold: the server's sends block mid-batch
    events.publish_many(r, job_id, step_events(1, count + 1, pad=pad), maxlen=10000)
    with serve(create_app(settings.model_copy(update={"redis_url": redis_url}), dispatch=None)) as url:
        slow = SlowFollower(url, job_id, auth)
        assert slow.connected.wait(10)
        # Its first read returned a batch whose sends fill the sockets: the generator waits to send more.
        wait_for(lambda: xread_calls(r) >= 1, timeout=10, what="the follower's first read")
        stop_redis()
        r = start_redis()  # empty: the stream is lost
        steps(r, job_id, count + 1, count + 3)
        set_state(sessions, job_id, "succeeded")
        slow.go.set()
        slow.join(60)
        assert not slow.is_alive()
    got = [(e[1], e[2].get("step")) for e in parse(slow.lines)]
    sent = [s for name, s in got if name == "step"]
    assert sent == list(range(1, len(sent) + 1)), "no step skipped"
    assert len(sent) < count and ("end", None) not in got, "the stream ends without its end: the client resumes"
