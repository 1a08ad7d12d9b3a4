"""POST /jobs, GET /jobs, GET /jobs/{id}, cancel, metrics: happy paths and every error shape."""

from __future__ import annotations

import os
import time

import pytest

from core.models import Job, JobMetric
from core.scheduler import GpuInfo, register_box
from tests.api.conftest import make_user, spec


def add_box(sessions, n=3, name="box1", memory_mb=24564):
    with sessions() as s:
        register_box(s, name, [GpuInfo(i, "RTX 4090", memory_mb) for i in range(n)])
        s.commit()


def only_error(resp, status):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"detail"} and isinstance(body["detail"], list) and body["detail"]
    for item in body["detail"]:
        assert set(item) == {"loc", "msg", "type"}
    return body["detail"]


def test_submit_queues_job_without_boxes(client, dispatched):
    r = client.post("/jobs", json=spec())
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["state"] == "queued" and job["owner"] == "local" and job["attempt"] == 1
    assert job["queue_position"] == 1 and job["gpu_ids"] is None
    assert job["spec"]["deepspeed"]["train_batch_size"] == 8
    assert job["progress"] == {
        "step": None,
        "total_steps": None,
        "epoch": None,
        "fraction": None,
        "eta_s": None,
    }
    assert job["artifacts"] == {"href": f"/jobs/{job['id']}/artifacts"}
    assert dispatched.calls == []


def test_submit_places_job_when_gpus_are_free(client, sessions, dispatched):
    add_box(sessions)
    r = client.post("/jobs", json=spec(gpus=2, deepspeed={"train_batch_size": 8}), headers=make_user(client, "ann"))
    job = r.json()
    assert r.status_code == 201 and job["state"] == "starting", job
    assert job["gpu_ids"] == [0, 1] and job["box"] == "box1" and job["owner"] == "ann"
    assert job["queue_position"] is None and "master_port" not in job
    assert dispatched.calls == [(job["id"], 1, "trainbox.box.box1")]


def test_article_config_is_refused_with_valid_choices(client):
    body = spec(gpus=3, deepspeed={"train_batch_size": 32, "gradient_accumulation_steps": 4})
    [err] = only_error(client.post("/jobs", json=body), 422)
    assert err["loc"] == ["body"]
    assert "impossible batch" in err["msg"] and "32" in err["msg"]
    assert "valid nearby choices" in err["msg"] and "x 3 GPUs" in err["msg"]
    assert not err["msg"].startswith("Value error")


@pytest.mark.parametrize(
    ("body", "loc", "fragment"),
    [
        (spec(trust_remote_code=True), ["body", "trust_remote_code"], "Extra inputs are not permitted"),
        (
            spec(deepspeed={"tensorboard": {"enabled": True}}),
            ["body", "deepspeed"],
            "'tensorboard' is refused",
        ),
        (spec(deepspeed={"autotuning": {}}), ["body", "deepspeed"], "refused"),
        (
            spec(deepspeed={"flux_capacitor": 1}),
            ["body", "deepspeed"],
            "unknown DeepSpeed key 'flux_capacitor'",
        ),
        (
            spec(deepspeed={"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}),
            ["body", "deepspeed", "zero_optimization", "offload_param"],
            "NVMe offload is refused",
        ),
        (spec(gpus=0), ["body", "gpus"], "greater than or equal to 1"),
        (spec(name="bad name!"), ["body", "name"], "name must be"),
        (spec(model="preset:huge"), ["body", "model"], "unknown preset"),
        (spec(dataset={"path": "/etc/passwd"}), ["body", "dataset"], "not absolute"),
        (spec(dataset={"path": "../secret.jsonl"}), ["body", "dataset"], "must not contain '..'"),
        (spec(model="../models/x"), ["body", "model"], "must not contain '..'"),
        (spec(dataset={"path": "corpus/a\x00b.jsonl"}), ["body", "dataset"], "without NUL bytes"),
        (spec(model="~/models/x"), ["body", "model"], "not absolute"),
        (spec(env={"LD_PRELOAD": "/tmp/x.so"}), ["body", "env"], "Extra inputs are not permitted"),
        (spec(launcher_args=["--master_addr", "evil"]), ["body", "launcher_args"], "Extra inputs are not permitted"),
        (spec(deepspeed={"flops_profiler": {"output_file": "/etc/x"}}), ["body", "deepspeed"], "refused"),
        (spec(deepspeed={"csv_monitor": {"output_path": "/tmp"}}), ["body", "deepspeed"], "refused"),
        (spec(deepspeed={"checkpoint": {"load_universal": True}}), ["body", "deepspeed"], "refused"),
        (spec(deepspeed={"aio": {"block_size": 1}}), ["body", "deepspeed"], "refused"),
        (
            spec(deepspeed={"zero_optimization": {"offload_optimizer": {"device": "cpu", "nvme_path": "/tmp"}}}),
            ["body", "deepspeed", "zero_optimization", "offload_optimizer"],
            "NVMe offload is refused",
        ),
    ],
)
def test_invalid_specs_are_422_with_precise_messages(client, body, loc, fragment):
    errors = only_error(client.post("/jobs", json=body), 422)
    assert any(e["loc"][: len(loc)] == loc and fragment in e["msg"] for e in errors), errors
    assert client.get("/jobs").json()["data"] == []


@pytest.mark.parametrize(
    ("body", "loc", "fragment"),
    [
        (
            spec(dataset={"path": "corpus/missing.jsonl"}),
            ["body", "dataset", "path"],
            "not found under the data root",
        ),
        (
            spec(dataset={"path": "corpus/bad.jsonl"}),
            ["body", "dataset", "text_field"],
            "no text field 'text'",
        ),
        (spec(dataset={"id": "nope"}), ["body", "dataset", "id"], "no uploaded dataset"),
        (spec(model="nowhere"), ["body", "model"], "not found under the model root"),
        (spec(model="no-config"), ["body", "model"], "has no config.json"),
        (spec(model="someorg/not-in-any-cache-xyz"), ["body", "model"], "nor in the local Hugging Face cache"),
    ],
)
def test_file_checks(client, body, loc, fragment):
    [err] = only_error(client.post("/jobs", json=body), 422)
    assert err["loc"] == loc and fragment in err["msg"], err
    assert client.get("/jobs").json()["data"] == []


def test_symlink_escaping_a_root_is_refused(client, settings, tmp_path):
    outside = tmp_path / "outside.jsonl"
    outside.write_text('{"text": "secret"}\n')
    link = settings.data_root / "corpus" / "escape.jsonl"
    link.unlink(missing_ok=True)
    os.symlink(outside, link)
    [err] = only_error(client.post("/jobs", json=spec(dataset={"path": "corpus/escape.jsonl"})), 422)
    assert "outside its configured root" in err["msg"]
    assert client.get("/jobs").json()["data"] == []


def test_local_model_dir_and_text_dataset_are_accepted(client):
    r = client.post("/jobs", json=spec(model="my-llama", dataset={"path": "corpus/notes.txt"}))
    assert r.status_code == 201, r.text


def test_malformed_bodies_are_422_not_500(client):
    only_error(client.post("/jobs", content=b"{not json", headers={"content-type": "application/json"}), 422)
    only_error(client.post("/jobs", json=[1, 2]), 422)
    only_error(client.post("/jobs", json={"name": "x", "model": 5, "dataset": "x"}), 422)


def test_more_gpus_than_any_box_is_refused(client, sessions):
    add_box(sessions, n=2)
    [err] = only_error(client.post("/jobs", json=spec(gpus=3, deepspeed={"train_batch_size": 6})), 422)
    assert err["loc"] == ["body", "gpus"] and "largest has 2" in err["msg"]


def test_idempotency_key(client, settings):
    h = {"Idempotency-Key": "k-1"}
    first = client.post("/jobs", json=spec(), headers=h)
    again = client.post("/jobs", json=spec(), headers=h)
    assert first.status_code == again.status_code == 201
    assert again.json()["id"] == first.json()["id"] and again.headers["Idempotent-Replayed"] == "true"
    # Same meaning written differently (a default spelled out) is the same body.
    same = client.post("/jobs", json=spec(seed=42), headers=h)
    assert same.json()["id"] == first.json()["id"]
    [err] = only_error(client.post("/jobs", json=spec(seed=7), headers=h), 409)
    assert err["loc"] == ["header", "Idempotency-Key"] and first.json()["id"] in err["msg"]
    # A replay answers with the job even if its data has moved since.
    (settings.data_root / "corpus" / "train.jsonl").rename(settings.data_root / "corpus" / "moved.jsonl")
    try:
        assert client.post("/jobs", json=spec(), headers=h).json()["id"] == first.json()["id"]
    finally:
        (settings.data_root / "corpus" / "moved.jsonl").rename(settings.data_root / "corpus" / "train.jsonl")
    # Keys are per user: bob's "k-1" is his own (and he cannot replay into local's job).
    other_user = client.post("/jobs", json=spec(seed=7), headers={**h, **make_user(client, "bob")})
    assert other_user.status_code == 201 and other_user.json()["id"] != first.json()["id"]
    assert len(client.get("/jobs").json()["data"]) == 2


def test_list_newest_first_filters_and_cursor(client):
    users = {"ann": make_user(client, "ann"), "bob": make_user(client, "bob")}
    ids = [
        client.post("/jobs", json=spec(name=f"j{i}"), headers=users["ann" if i % 2 else "bob"]).json()["id"]
        for i in range(5)
    ]
    client.post(f"/jobs/{ids[0]}/cancel")
    page = client.get("/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in page["data"]] == ids[::-1][:2] and page["next_cursor"]
    seen = [j["id"] for j in page["data"]]
    while page["next_cursor"]:
        page = client.get("/jobs", params={"limit": 2, "cursor": page["next_cursor"]}).json()
        seen += [j["id"] for j in page["data"]]
    assert seen == ids[::-1]
    ann = client.get("/jobs", params={"owner": "ann"}).json()["data"]
    assert [j["id"] for j in ann] == [ids[3], ids[1]]
    cancelled = client.get("/jobs", params={"state": "cancelled"}).json()["data"]
    assert [j["id"] for j in cancelled] == [ids[0]]
    both = client.get("/jobs", params=[("state", "cancelled"), ("state", "queued")]).json()["data"]
    assert len(both) == 5
    queued = {j["id"]: j["queue_position"] for j in client.get("/jobs", params={"state": "queued"}).json()["data"]}
    assert queued == {ids[1]: 1, ids[2]: 2, ids[3]: 3, ids[4]: 4}


def test_list_errors(client):
    [err] = only_error(client.get("/jobs", params={"state": "sleeping"}), 422)
    assert err["loc"] == ["query", "state", 0]
    [err] = only_error(client.get("/jobs", params={"cursor": "garbage!"}), 422)
    assert err["loc"] == ["query", "cursor"]
    only_error(client.get("/jobs", params={"limit": 0}), 422)


def test_get_job_and_404(client, sessions):
    job_id = client.post("/jobs", json=spec()).json()["id"]
    assert client.get(f"/jobs/{job_id}").json()["id"] == job_id
    [err] = only_error(client.get("/jobs/j0000000000000000"), 404)
    assert err == {"loc": ["path", "job_id"], "msg": "job 'j0000000000000000' not found", "type": "not_found"}
    only_error(client.get("/jobs/bad..id"), 422)
    only_error(client.get("/no/such/route"), 404)
    only_error(client.delete(f"/jobs/{job_id}"), 405)


def test_progress_eta_and_latest(client, sessions):
    job_id = client.post("/jobs", json=spec()).json()["id"]
    now = time.time()
    with sessions() as s:
        job = s.get(Job, job_id)
        job.state, job.total_steps, job.step, job.epoch = "running", 100, 30, 0
        job.rate_origin = {"step": 10, "time": now - 40}
        job.latest = {"step": 30, "loss": 2.5, "lr": 5e-5, "tokens_per_s": 1000.0, "time": now}
        s.commit()
    job = client.get(f"/jobs/{job_id}").json()
    p = job["progress"]
    assert (p["step"], p["total_steps"], p["fraction"]) == (30, 100, 0.3)
    assert 135 <= p["eta_s"] <= 140  # 70 steps at 2 s/step
    assert job["latest"]["loss"] == 2.5 and job["latest"]["step"] == 30


def test_cancel_queued_is_immediate_and_idempotent(client, sessions, dispatched):
    add_box(sessions, n=1)
    running = client.post("/jobs", json=spec()).json()
    head = client.post("/jobs", json=spec()).json()
    behind = client.post("/jobs", json=spec()).json()
    assert (running["state"], head["state"], behind["state"]) == ("starting", "queued", "queued")
    r = client.post(f"/jobs/{head['id']}/cancel")
    assert r.status_code == 202 and r.json()["state"] == "cancelled" and r.json()["finished_at"]
    again = client.post(f"/jobs/{head['id']}/cancel")
    assert again.status_code == 202 and again.json()["state"] == "cancelled"
    assert client.get(f"/jobs/{behind['id']}").json()["queue_position"] == 1


def test_cancel_running_asks_the_worker(client, sessions):
    add_box(sessions, n=1)
    job = client.post("/jobs", json=spec()).json()
    with sessions() as s:
        s.get(Job, job["id"]).state = "running"
        s.commit()
    r = client.post(f"/jobs/{job['id']}/cancel")
    assert r.status_code == 202 and r.json()["state"] == "cancelling" and r.json()["cancel_requested"]
    assert client.post(f"/jobs/{job['id']}/cancel").json()["state"] == "cancelling"
    only_error(client.post("/jobs/j0000000000000000/cancel"), 404)


def test_cancel_finished_job_changes_nothing(client, sessions):
    job = client.post("/jobs", json=spec()).json()
    with sessions() as s:
        s.get(Job, job["id"]).state = "succeeded"
        s.commit()
    r = client.post(f"/jobs/{job['id']}/cancel")
    assert r.status_code == 202 and r.json()["state"] == "succeeded"


def test_metrics_paging(client, sessions):
    job_id = client.post("/jobs", json=spec()).json()["id"]
    with sessions() as s:
        s.add_all(
            JobMetric(job_id=job_id, attempt=1, step=i, epoch=0, loss=3.0 - i / 10, lr=1e-4, time=1000.0 + i)
            for i in range(1, 8)
        )
        s.commit()
    page = client.get(f"/jobs/{job_id}/metrics", params={"limit": 3}).json()
    assert [m["step"] for m in page["data"]] == [1, 2, 3] and page["next_after_step"] == 3
    page = client.get(f"/jobs/{job_id}/metrics", params={"after_step": 6, "limit": 3}).json()
    assert [m["step"] for m in page["data"]] == [7] and page["next_after_step"] is None
    assert page["data"][0]["loss"] == pytest.approx(2.3)
    only_error(client.get(f"/jobs/{job_id}/metrics", params={"limit": 0}), 422)
    only_error(client.get("/jobs/j0000000000000000/metrics"), 404)


# --- bad input: each was a 500, an endless request, or a value stored that breaks something later ----


def test_huge_batch_is_refused_at_once_naming_the_limit(client):
    """train_batch_size 200000001 with accumulation 2 took 5.6 s of the event loop (a divisor search)."""
    body = spec(deepspeed={"train_batch_size": 200000001, "gradient_accumulation_steps": 2})
    errors = only_error(client.post("/jobs/validate", json=body), 422)
    assert errors[0]["loc"] == ["body", "deepspeed", "train_batch_size"]
    assert "less than or equal to 1048576" in errors[0]["msg"]


@pytest.mark.parametrize("model", ["foo/bar baz", "foo/-bar", "a/b--c", "foo/bar.", "foo/bar\n", "foo/.bar"])
def test_hub_ids_the_hub_rejects_are_422_not_500(client, model):
    [err] = only_error(client.post("/jobs", json=spec(model=model)), 422)
    assert err["loc"] == ["body", "model"], err


def test_symlink_loop_as_dataset_is_422_not_500(client, settings):
    corpus = settings.data_root / "corpus"
    for a, b in (("loop-a", "loop-b"), ("loop-b", "loop-a")):
        (corpus / a).unlink(missing_ok=True)
        os.symlink(corpus / b, corpus / a)
    [err] = only_error(client.post("/jobs", json=spec(dataset={"path": "corpus/loop-a"})), 422)
    assert err["loc"] == ["body", "dataset", "path"] and "symlink loop" in err["msg"]


def test_step_counts_fit_the_32_bit_columns(client, settings):
    """max_steps 10**30 was accepted; every metric insert of the job then failed."""
    [err] = only_error(client.post("/jobs", json=spec(max_steps=10**30)), 422)
    assert err["loc"] == ["body", "max_steps"] and "1000000000" in err["msg"]
    # Epochs of a (sparse) 100 GB file at 8 tokens a step: more steps than a job may have.
    big = settings.data_root / "corpus" / "huge.jsonl"
    with big.open("wb") as f:
        f.write(b'{"text": "a"}\n' * 300)
        f.seek(100 << 30)
        f.write(b"\n")
    try:
        body = spec(max_steps=None, seq_len=8, dataset={"path": "corpus/huge.jsonl"}, deepspeed={"train_batch_size": 1})
        [err] = only_error(client.post("/jobs", json=body), 422)
        assert err["type"] == "too_many_steps" and "set max_steps" in err["msg"]
    finally:
        big.unlink()


def test_infinity_and_nan_are_refused_everywhere(client):
    """`gradient_clipping: Infinity` was accepted and stored as JSON no parser reads back."""
    for raw in (
        b'"gradient_clipping": Infinity',
        b'"gradient_clipping": NaN',
        b'"optimizer": {"params": {"lr": -Infinity}}',
        b'"scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": NaN}}',
    ):
        body = b'{"name": "x", "model": "preset:tiny", "dataset": {"path": "corpus/train.jsonl"}, "deepspeed": {'
        errors = only_error(client.post("/jobs", content=body + raw + b"}}", headers=JSON), 422)
        assert errors[0]["type"] == "finite_number" and errors[0]["loc"][:2] == ["body", "deepspeed"], errors
    assert client.get("/jobs").json()["data"] == []


JSON = {"content-type": "application/json"}


@pytest.mark.parametrize("name", ["evil\n", "x" * 100 + "\n"])
def test_names_ending_in_a_newline_are_refused(client, name):
    """`$` let "evil\\n" through; 101 characters went into a 100-character column."""
    [err] = only_error(client.post("/jobs", json=spec(name=name)), 422)
    assert err["loc"] == ["body", "name"]


@pytest.mark.parametrize(("field", "value"), [("gpus", True), ("priority", False), ("seed", "42"), ("epochs", 1.5)])
def test_integers_are_strict(client, field, value):
    [err] = only_error(client.post("/jobs", json=spec(**{field: value})), 422)
    assert err["loc"] == ["body", field]


def test_unreadable_body_is_a_documented_422(client):
    """A body that is not UTF-8 got FastAPI's 400, which no operation documents."""
    for body in (b"\xff\xfe\x00{", b'{"name": "\xe9"}'):
        [err] = only_error(client.post("/jobs", content=body, headers=JSON), 422)
        assert err["loc"][0] == "body"


def test_405_lists_every_method_of_the_path(client):
    """Only the first route's methods were listed: DELETE /jobs answered `Allow: POST`, hiding GET."""
    r = client.delete("/jobs")
    assert r.status_code == 405 and r.headers["allow"] == "GET, POST"
    r = client.request("OPTIONS", "/jobs/j0000000000000000")
    assert r.status_code == 405 and r.headers["allow"] == "GET"
    # The most specific path: /jobs/validate is its own path, not a job id under /jobs/{job_id}.
    assert client.request("OPTIONS", "/jobs/validate").headers["allow"] == "POST"
    assert client.request("OPTIONS", "/users/me").headers["allow"] == "GET"


def test_cursor_format_is_stated_and_every_match_is_a_position(client):
    """A cursor matching the documented pattern always gets a page (schemathesis found schema-valid 422s)."""
    client.post("/jobs", json=spec())
    assert client.get("/jobs", params={"cursor": "0.j"}).json() == {"data": [], "next_cursor": None}
    assert len(client.get("/jobs", params={"cursor": "99999999999999999.zzzz"}).json()["data"]) == 1
    schema = client.get("/openapi.json").json()
    [cursor] = [p for p in schema["paths"]["/jobs"]["get"]["parameters"] if p["name"] == "cursor"]
    assert cursor["schema"]["anyOf"][0]["pattern"]


def test_broken_multipart_is_a_documented_422(client):
    """Starlette's form parser answered 400 (found by schemathesis on POST /datasets)."""
    b = "c8e8b97592ca074a65860c19e40c7b23"
    body = f"--{b}\r\n48515--{b}--\r\n".encode()
    r = client.post("/datasets", content=body, headers={"content-type": f"multipart/form-data; boundary={b}"})
    [err] = only_error(r, 422)
    assert err["loc"] == ["body"] and err["type"] == "body_invalid"
