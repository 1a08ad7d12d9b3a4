"""Per-user limits, the submit rate limit, body size and JSON depth: each refusal names its limit and
stores or starts nothing."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select

from core.models import Job
from tests.api.conftest import make_user, spec
from tests.api.test_jobs import add_box, only_error


def count_jobs(sessions) -> int:
    with sessions() as s:
        return s.scalar(select(func.count()).select_from(Job)) or 0


def limits(client, name, **values):
    r = client.patch(f"/users/{name}", json=values)  # as the admin `local`
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("override", "body", "loc", "fragments"),
    [
        (
            {"max_gpus": 1},
            spec(gpus=2, deepspeed={"train_batch_size": 8}),
            ["body", "gpus"],
            ["gpus 2 is more than your 1 GPUs in use at once", "max_gpus", "TRAINBOX_MAX_GPUS_PER_USER"],
        ),
        (
            {"max_runtime_s": 3600},
            spec(max_runtime_s=7200),
            ["body", "max_runtime_s"],
            ["max_runtime_s 7200 is over your cap of 3600 s", "TRAINBOX_MAX_RUNTIME_S"],
        ),
        ({}, spec(priority=5), ["body", "priority"], ["priority 5 is above your ceiling of 0", "max_priority"]),
        ({"max_priority": 3}, spec(priority=4), ["body", "priority"], ["ceiling of 3", "--max-priority"]),
    ],
)
def test_spec_over_a_limit_is_403_naming_it(client, sessions, dispatched, override, body, loc, fragments):
    add_box(sessions)
    ann = make_user(client, "ann")
    if override:
        limits(client, "ann", **override)
    for path in ("/jobs/validate", "/jobs"):
        [err] = only_error(client.post(path, json=body, headers=ann), 403)
        assert err["loc"] == loc and err["type"] == "limit_exceeded"
        for fragment in fragments:
            assert fragment in err["msg"], err["msg"]
    assert count_jobs(sessions) == 0 and dispatched.calls == []


def test_admins_have_no_priority_ceiling(client):
    r = client.post("/jobs", json=spec(priority=50))  # the default client is the admin `local`
    assert r.status_code == 201 and r.json()["priority"] == 50


def test_queued_jobs_limit(client, sessions):
    ann = make_user(client, "ann")
    limits(client, "ann", max_queued=2)
    for i in range(2):
        assert client.post("/jobs", json=spec(name=f"q{i}"), headers=ann).status_code == 201
    [err] = only_error(client.post("/jobs", json=spec(name="q2"), headers=ann), 403)
    assert "you have 2 jobs queued" in err["msg"] and "max_queued" in err["msg"]
    assert count_jobs(sessions) == 2
    # Another user's queue is their own.
    assert client.post("/jobs", json=spec(), headers=make_user(client, "bob")).status_code == 201


def test_submit_rate_limit_is_429_with_retry_after(client, sessions):
    ann = make_user(client, "ann")
    limits(client, "ann", submit_rate_per_minute=2)
    for i in range(2):
        assert client.post("/jobs", json=spec(name=f"r{i}"), headers=ann).status_code == 201
    r = client.post("/jobs", json=spec(name="r2"), headers=ann)
    [err] = only_error(r, 429)
    assert err["type"] == "rate_limited" and "2 per minute" in err["msg"] and "submit_rate_per_minute" in err["msg"]
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    assert count_jobs(sessions) == 2
    assert client.post("/jobs", json=spec(), headers=make_user(client, "bob")).status_code == 201, "per user"


def test_the_scheduler_holds_a_user_at_their_gpu_cap_without_blocking_others(client, sessions, dispatched):
    add_box(sessions, n=3)
    ann, bob = make_user(client, "ann"), make_user(client, "bob")
    limits(client, "ann", max_gpus=2)
    first = client.post("/jobs", json=spec(gpus=2, deepspeed={"train_batch_size": 8}), headers=ann).json()
    second = client.post("/jobs", json=spec(gpus=1), headers=ann).json()
    other = client.post("/jobs", json=spec(gpus=1), headers=bob).json()
    assert (first["state"], second["state"], other["state"]) == ("starting", "queued", "starting")
    client.post(f"/jobs/{first['id']}/cancel", headers=ann)
    with sessions() as s:  # the worker finishes the cancel and frees the GPUs
        job = s.get(Job, first["id"])
        job.state = "cancelled"
        from core.scheduler import free_gpus, schedule

        free_gpus(s, job.id)
        s.commit()
        schedule(s, None, max_gpus_per_user=None)
    assert client.get(f"/jobs/{second['id']}", headers=ann).json()["state"] == "starting"


def test_body_over_the_size_limit_is_413(client, sessions, settings):
    big = spec(name="x" * 10)
    big["padding"] = "y" * (settings.max_body_bytes + 10)
    [err] = only_error(client.post("/jobs", content=json.dumps(big), headers={"content-type": "application/json"}), 413)
    assert err["type"] == "too_large" and str(settings.max_body_bytes) in err["msg"]

    def chunks():  # no Content-Length: counted as it arrives
        data = json.dumps(big).encode()
        for i in range(0, len(data), 65536):
            yield data[i : i + 65536]

    only_error(client.post("/jobs", content=chunks(), headers={"content-type": "application/json"}), 413)
    assert count_jobs(sessions) == 0


@pytest.mark.parametrize("opener", ["[", '{"a":'])
def test_deeply_nested_json_is_refused(client, sessions, opener):
    closer = "]" if opener == "[" else "}"
    deep = opener * 5000 + "1" + closer * 5000
    for path in ("/jobs", "/jobs/validate"):
        r = client.post(path, content=deep, headers={"content-type": "application/json"})
        [err] = only_error(r, 422)
        assert err["type"] == "too_deep" and "nested deeper than 32 levels" in err["msg"]
    # Brackets inside strings are text, not nesting.
    ok = client.post("/jobs", json=spec(name="brackets"), headers={"X-Note": "[[[["})
    assert ok.status_code == 201
    assert count_jobs(sessions) == 1


def test_json_depth_counts_structure_not_strings():
    from api.hardening import json_depth

    assert json_depth(b'{"a": [1, {"b": "[[[[{{{{"}], "c": "\\"]]]"}') == 3
    assert json_depth(b"[]") == 1 and json_depth(b"1") == 0
