"""Admission caps with small numbers, against a real uvicorn: a slow request holds its slot until its
response starts; the global cap answers 503 after a short wait, the per-user caps 429 at once, both
with Retry-After; a stream holds no request slot, only a stream slot; every count returns to zero."""

from __future__ import annotations

import socket
import time
from urllib.parse import urlparse

import httpx

from api.app import create_app
from tests.api.conftest import make_user, serve, spec
from tests.api.test_events import Follower, set_state


def _slow_upload(url: str, token_headers: dict[str, str]) -> socket.socket:
    """An authenticated upload whose body never finishes: it holds a request slot while it is read."""
    u = urlparse(url)
    sock = socket.create_connection((u.hostname, u.port), timeout=5)
    head = "POST /datasets HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
    head += "Content-Type: multipart/form-data; boundary=b\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in token_headers.items()) + "\r\n"
    sock.sendall(head.encode() + b"--b\r\n")
    return sock


def test_caps_answer_fast_with_retry_after_and_release(client, settings, sessions):
    small = settings.model_copy(
        update={
            "api_max_inflight": 2,
            "api_max_inflight_per_user": 1,
            "api_admission_wait_s": 0.3,
            "api_max_streams_per_user": 1,
            "api_max_streams": 2,
        }
    )
    ann, bob, cyd = make_user(client, "ann"), make_user(client, "bob"), make_user(client, "cyd")
    app = create_app(small, dispatch=None)
    admission = app.state.admission
    with serve(app) as url, httpx.Client(base_url=url, timeout=10) as http:
        job = http.post("/jobs", json=spec(), headers=cyd).json()["id"]
        slow = [_slow_upload(url, ann), _slow_upload(url, bob)]
        try:
            from tests.helpers import wait_for

            wait_for(lambda: admission.slots.free == 0, timeout=5, what="both slots taken")
            t = time.monotonic()
            r = http.get("/jobs", headers=ann)  # ann already has one in progress
            assert (r.status_code, r.headers["Retry-After"]) == (429, "1") and time.monotonic() - t < 0.3
            assert r.json()["detail"][0]["type"] == "rate_limited"
            t = time.monotonic()
            r = http.get(f"/jobs/{job}", headers=cyd)  # cyd has none, but the server is full
            waited = time.monotonic() - t
            assert (r.status_code, r.headers["Retry-After"]) == (503, "1") and 0.3 <= waited < 2, waited
            assert http.get("/healthz").status_code == 200, "health is never queued"
        finally:
            for s in slow:
                s.close()
        wait_for(lambda: admission.slots.free == 2, timeout=5, what="slots given back")
        assert http.get(f"/jobs/{job}", headers=cyd).status_code == 200
        # Streams: one open per user holds no request slot; a second of the same user is refused.
        first = Follower(url, job, cyd)
        wait_for(lambda: first.events(), timeout=5, what="the stream")
        assert admission.slots.free == 2 and admission.open_streams == 1
        r = http.get(f"/jobs/{job}/events", headers=cyd)
        assert (r.status_code, r.headers["Retry-After"]) == (429, "1")
        set_state(sessions, job, "succeeded")
        assert first.ended.wait(10)
        wait_for(lambda: admission.open_streams == 0, timeout=5, what="the stream slot given back")
    assert admission.inflight == {} and admission.streams == {} and admission.slots.free == 2


def test_the_sdk_waits_out_a_short_busy_answer_and_gives_up_on_a_long_one(client, settings):
    """A user at their in-flight cap gets 429 with Retry-After: 1; the SDK waits and retries, so a
    script sees its answer. The submit rate limit's long Retry-After reaches the caller at once."""
    import threading

    from api.limits import RATE_WINDOW_S
    from client.sdk import Client, TrainboxError

    small = settings.model_copy(update={"api_max_inflight_per_user": 1, "submit_rate_per_minute": 1})
    ann = make_user(client, "ann")
    # The rate window is a fixed calendar minute: both submissions must fall in one.
    left = RATE_WINDOW_S - time.time() % RATE_WINDOW_S
    if left < 8:
        time.sleep(left + 0.1)
    app = create_app(small, dispatch=None)
    with serve(app) as url, Client(url, ann["Authorization"].removeprefix("Bearer ")) as sdk:
        job = sdk.submit(spec())
        slow = _slow_upload(url, ann)
        from tests.helpers import wait_for

        wait_for(lambda: app.state.admission.slots.free < small.api_max_inflight, timeout=5, what="the slot taken")
        threading.Timer(0.5, slow.close).start()  # the slow request ends while the SDK waits
        t = time.monotonic()
        assert sdk.get(job["id"])["id"] == job["id"]
        assert time.monotonic() - t >= 0.9, "it waited Retry-After before the retry"
        t = time.monotonic()
        try:
            sdk.submit(spec())
            raise AssertionError("the second submission this minute must be refused")
        except TrainboxError as e:
            assert e.status_code == 429 and time.monotonic() - t < 1
