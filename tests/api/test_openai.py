"""The OpenAI fine-tuning view under /v1 (the real app, SQLite and Postgres, TestClient): files are uploads,
fine-tuning jobs are jobs; the request -> JobSpec mapping, OpenAI's error envelope, paging, ownership.
The official client against a live stack: tests/api/test_openai_live.py."""

from __future__ import annotations

import json
import time

import pytest
from sqlalchemy import select

from api.openai.mapping import BASE_LEARNING_RATE, auto_batch, auto_epochs, auto_lr_multiplier
from core.models import Job, JobMetric
from tests.api.conftest import make_user
from tests.api.test_jobs import add_box, only_error

pytestmark = pytest.mark.usefixtures("clean_uploads")


def chat_lines(n: int, answer: str = "four") -> bytes:
    rows = [
        {"messages": [{"role": "user", "content": f"what is {i} plus {i}?"}, {"role": "assistant", "content": answer}]}
        for i in range(n)
    ]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


CHAT = chat_lines(60)


def upload(client, content: bytes = CHAT, headers=None, purpose="fine-tune", filename="train.jsonl"):
    return client.post("/v1/files", files={"file": (filename, content)}, data={"purpose": purpose}, headers=headers)


def openai_error(resp, status: int) -> dict:
    """The one error of an OpenAI envelope, with exactly its four fields."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def create(client, headers, training_file: str, **fields):
    body = {"model": "preset:tiny", "training_file": training_file, **fields}
    body.setdefault("trainbox", {"seq_len": 64, "max_steps": 5})
    return client.post("/v1/fine_tuning/jobs", json=body, headers=headers)


def test_a_file_is_an_upload(client, settings):
    ann = make_user(client, "ann")
    r = upload(client, CHAT, ann)
    assert r.status_code == 200, r.text
    f = r.json()
    assert f["id"].startswith("file-d") and f["object"] == "file" and f["purpose"] == "fine-tune"
    assert f["bytes"] == len(CHAT) and f["filename"] == "train.jsonl" and f["status"] == "processed"
    assert abs(f["created_at"] - time.time()) < 60
    # The same upload in the trainbox view, checked as chat data.
    [ds] = client.get("/datasets", headers=ann).json()["data"]
    assert ds["id"] == f["id"].removeprefix("file-") and ds["format"] == "chat" and ds["records"] == 60
    assert client.get("/v1/files", headers=ann).json()["data"] == [f]
    assert client.get(f"/v1/files/{f['id']}", headers=ann).json() == f
    assert client.get(f"/v1/files/{f['id']}/content", headers=ann).content == CHAT
    r = client.delete(f"/v1/files/{f['id']}", headers=ann)
    assert r.status_code == 200 and r.json() == {"id": f["id"], "object": "file", "deleted": True}
    err = openai_error(client.get(f"/v1/files/{f['id']}", headers=ann), 404)
    assert err["code"] == "file_not_found" and f["id"] in err["message"] and err["param"] == "file_id"
    assert client.get("/datasets", headers=ann).json()["data"] == []


def test_file_errors_use_the_openai_envelope(client, settings):
    ann = make_user(client, "ann")
    err = openai_error(upload(client, CHAT, ann, purpose="assistants"), 400)
    assert err["param"] == "purpose" and "'assistants' is not supported" in err["message"]
    bad = CHAT + b'{"messages": [{"role": "user", "content": "no answer"}]}\n'
    err = openai_error(upload(client, bad, ann), 400)
    assert "line 61" in err["message"] and "no assistant message" in err["message"], err
    assert err["type"] == "invalid_request_error" and err["param"] == "file"
    err = openai_error(upload(client, b'{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n', ann), 400)
    assert "line 2" in err["message"] and "'completion'" in err["message"], err
    err = openai_error(client.get("/v1/files", headers={"Authorization": "Bearer nope"}), 401)
    assert err["code"] == "invalid_api_key"
    err = openai_error(upload(client, CHAT, {"Authorization": "Bearer nope"}), 401)
    big = CHAT * (settings.max_upload_bytes // len(CHAT) + 2)  # refused by the body limit, before the route
    err = openai_error(upload(client, big, ann), 413)
    assert err["code"] == "too_large" and err["param"] is None
    openai_error(client.get("/v1/files/file-dnothere", headers=ann), 404)
    openai_error(client.get("/v1/files/whatever", headers=ann), 404)
    assert client.get("/v1/files", headers=ann).json()["data"] == []
    # The rest of the API keeps its own shape.
    [detail] = only_error(client.get("/jobs/jnothere", headers=ann), 404)
    assert detail["type"] == "not_found"


V1_ROUTES = [
    ("POST", "/v1/files"),
    ("GET", "/v1/files"),
    ("GET", "/v1/files/file-d0"),
    ("GET", "/v1/files/file-d0/content"),
    ("DELETE", "/v1/files/file-d0"),
    ("POST", "/v1/fine_tuning/jobs"),
    ("GET", "/v1/fine_tuning/jobs"),
    ("GET", "/v1/fine_tuning/jobs/ftjob-j0"),
    ("POST", "/v1/fine_tuning/jobs/ftjob-j0/cancel"),
    ("GET", "/v1/fine_tuning/jobs/ftjob-j0/events"),
    ("GET", "/v1/fine_tuning/jobs/ftjob-j0/checkpoints"),
    ("POST", "/v1/fine_tuning/jobs/ftjob-j0/pause"),
    ("POST", "/v1/fine_tuning/jobs/ftjob-j0/resume"),
]


@pytest.mark.parametrize(("method", "path"), V1_ROUTES)
def test_every_v1_route_needs_a_token(client, method, path):
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer tbx_nope"}):
        err = openai_error(client.request(method, path, headers=headers), 401)
        assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"
    # Known to the caller: 404 (or 400 for a body that is missing) in the envelope, never a 401.
    assert client.request(method, path).status_code in (400, 404, 200)


def test_v1_is_not_in_trainbox_openapi_document(client):
    """/openapi.json describes trainbox's own API and error shape; /v1 follows OpenAI's reference."""
    paths = client.get("/openapi.json").json()["paths"]
    assert "/jobs" in paths and not [p for p in paths if p.startswith("/v1")]


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b'{"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}\n', "role 'tool'"),
        (b'{"messages": []}\n', "empty 'messages'"),
        (b'{"messages": [{"role": "assistant", "content": "y", "weight": 2}]}\n', "weight 2"),
        (b'{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "y"}]}\n', "empty content"),
        (b'{"prompt": "p", "completion": "c"}\n{"prompt": "p"}\n', "line 2"),
    ],
)
def test_uploads_are_checked_completely_as_training_data(client, content, fragment):
    """POST /datasets refuses with 422 in the trainbox shape; the same file under /v1 is a 400."""
    r = client.post("/datasets", files={"file": ("t.jsonl", content)})
    [detail] = only_error(r, 422)
    assert fragment in detail["msg"] and "line" in detail["msg"], detail
    err = openai_error(upload(client, content), 400)
    assert fragment in err["message"]


def test_a_prompt_completion_upload_is_detected_and_stored(client):
    content = b"".join(json.dumps({"prompt": f"q{i}", "completion": "a"}).encode() + b"\n" for i in range(5))
    ds = client.post("/datasets", files={"file": ("pc.jsonl", content)}).json()
    assert ds["format"] == "prompt_completion" and ds["records"] == 5
    chat = client.post("/datasets", files={"file": ("c.jsonl", CHAT)}, data={"format": "chat"}).json()
    assert chat["format"] == "chat"
    [detail] = only_error(
        client.post("/datasets", files={"file": ("c.jsonl", CHAT)}, data={"format": "prompt_completion"}), 422
    )
    assert "line 1" in detail["msg"] and "'prompt'" in detail["msg"]


def test_create_maps_onto_a_jobspec(client, sessions):
    ann = make_user(client, "ann")
    train, val = upload(client, CHAT, ann).json()["id"], upload(client, chat_lines(10), ann).json()["id"]
    r = create(
        client,
        ann,
        train,
        validation_file=val,
        hyperparameters={"n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 2},
        suffix="my-model",
        seed=7,
        metadata={"team": "nlp", "run": "1"},
        trainbox={"seq_len": 64, "max_steps": 5, "gpus": 2, "priority": -2, "max_runtime_s": 600},
    )
    assert r.status_code == 200, r.text
    ft = r.json()
    assert ft["object"] == "fine_tuning.job" and ft["id"].startswith("ftjob-j") and ft["status"] == "queued"
    assert ft["training_file"] == train and ft["validation_file"] == val and ft["model"] == "preset:tiny"
    assert ft["hyperparameters"] == {"n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 2.0}
    assert ft["method"] == {"type": "supervised", "supervised": {"hyperparameters": ft["hyperparameters"]}}
    assert ft["seed"] == 7 and ft["metadata"] == {"team": "nlp", "run": "1"} and ft["integrations"] == []
    assert ft["fine_tuned_model"] is None and ft["result_files"] == [] and ft["error"] is None
    assert ft["finished_at"] is None and ft["trained_tokens"] is None
    # The same job in the trainbox view: one store.
    job = client.get(f"/jobs/{ft['id'].removeprefix('ftjob-')}", headers=ann).json()
    spec = job["spec"]
    assert job["name"] == "my-model" and job["owner"] == "ann" and job["state"] == "queued" and job["priority"] == -2
    assert spec["dataset"]["id"] == train.removeprefix("file-") and spec["validation"]["id"] == val.removeprefix(
        "file-"
    )
    assert spec["epochs"] == 2 and spec["seed"] == 7 and spec["gpus"] == 2 and spec["max_runtime_s"] == 600
    assert spec["deepspeed"]["train_batch_size"] == 8
    assert spec["deepspeed"]["optimizer"]["params"]["lr"] == pytest.approx(2 * BASE_LEARNING_RATE)
    # The method form says the same.
    hp = {"n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 2}
    r = create(client, ann, train, method={"type": "supervised", "supervised": {"hyperparameters": hp}})
    assert r.status_code == 200 and r.json()["hyperparameters"] == ft["hyperparameters"], r.text
    with sessions() as s:
        assert s.get(Job, ft["id"].removeprefix("ftjob-")).suffix == "my-model"


def test_auto_hyperparameters_come_from_the_data_size(client):
    ann = make_user(client, "ann")
    train = upload(client, CHAT, ann).json()["id"]
    ft = create(client, ann, train, hyperparameters={"n_epochs": "auto", "batch_size": "auto"}).json()
    batch = auto_batch(60, 1)
    assert ft["hyperparameters"] == {
        "n_epochs": auto_epochs(60),
        "batch_size": batch,
        "learning_rate_multiplier": auto_lr_multiplier(batch),
    }
    assert auto_epochs(60) == 3 and auto_epochs(10) == 10 and auto_epochs(100_000) == 1
    assert auto_batch(60, 1) == 1 and auto_batch(10_000, 1) == 16 and auto_batch(10_000, 3) == 18
    assert auto_batch(10**7, 1) == 256 and auto_lr_multiplier(1) == 0.5 and auto_lr_multiplier(128) == 2.0
    # A trainbox deepspeed block keeps its own batch and learning rate.
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "optimizer": {"params": {"lr": 1e-3}}}
    ft = create(client, ann, train, trainbox={"seq_len": 64, "max_steps": 5, "deepspeed": ds}).json()
    assert ft["hyperparameters"]["batch_size"] == 4
    assert ft["hyperparameters"]["learning_rate_multiplier"] == pytest.approx(1e-3 / BASE_LEARNING_RATE)


def test_create_errors(client):
    ann, bob = make_user(client, "ann"), make_user(client, "bob")
    train = upload(client, CHAT, ann).json()["id"]
    for kind in ("dpo", "reinforcement"):
        err = openai_error(create(client, ann, train, method={"type": kind, kind: {}}), 400)
        assert (
            err["param"] == "method.type" and "not supported" in err["message"] and err["code"] == "unsupported_method"
        )
    err = openai_error(create(client, ann, "file-dnothere"), 400)
    assert err["param"] == "training_file" and err["code"] == "file_not_found"
    err = openai_error(create(client, bob, train), 400)  # another user's file is no file of bob's
    assert err["param"] == "training_file"
    pc = upload(client, b'{"prompt": "p", "completion": "c"}\n', ann).json()["id"]
    err = openai_error(create(client, ann, train, validation_file=pc), 400)
    assert err["param"] == "validation_file" and "prompt_completion" in err["message"]
    err = openai_error(create(client, ann, train, suffix="no:colons"), 400)
    assert err["param"] == "suffix"
    err = openai_error(create(client, ann, train, hyperparameters={"n_epochs": 0}), 400)
    assert err["param"].startswith("hyperparameters.n_epochs")
    err = openai_error(create(client, ann, train, trainbox={"seq_len": 64, "colour": "red"}), 400)
    assert err["param"] == "trainbox.colour"
    # The same JobSpec rules as POST /jobs: batch arithmetic, refused DeepSpeed keys, the model.
    err = openai_error(create(client, ann, train, hyperparameters={"batch_size": 3}, trainbox={"gpus": 2}), 400)
    assert err["code"] == "batch_arithmetic" and "train_batch_size" in err["message"], err
    err = openai_error(create(client, ann, train, trainbox={"deepspeed": {"tensorboard": {}}}), 400)
    assert "refused" in err["message"] and err["param"].startswith("trainbox.deepspeed")
    err = openai_error(create(client, ann, train, model="no-such-model"), 400)
    assert "model" in err["message"] and err["code"] == "file_not_usable", err
    err = openai_error(create(client, ann, train, metadata={f"k{i}": "v" for i in range(17)}), 400)
    assert err["param"] == "metadata"


def test_ownership_is_404_for_others(client):
    ann, bob = make_user(client, "ann"), make_user(client, "bob")
    f = upload(client, CHAT, ann).json()
    ft = create(client, ann, f["id"]).json()
    for method, path in [
        ("get", f"/v1/fine_tuning/jobs/{ft['id']}"),
        ("post", f"/v1/fine_tuning/jobs/{ft['id']}/cancel"),
        ("get", f"/v1/fine_tuning/jobs/{ft['id']}/events"),
        ("get", f"/v1/fine_tuning/jobs/{ft['id']}/checkpoints"),
        ("get", f"/v1/files/{f['id']}"),
        ("get", f"/v1/files/{f['id']}/content"),
        ("delete", f"/v1/files/{f['id']}"),
    ]:
        err = openai_error(getattr(client, method)(path, headers=bob), 404)
        assert err["type"] == "invalid_request_error", err
    assert client.get("/v1/fine_tuning/jobs", headers=bob).json() == {"object": "list", "data": [], "has_more": False}
    assert client.get("/v1/files", headers=bob).json()["data"] == []
    # The trainbox id names the same job; an admin sees it as its owner does.
    assert client.get(f"/v1/fine_tuning/jobs/{ft['id'].removeprefix('ftjob-')}", headers=ann).json()["id"] == ft["id"]
    assert client.get(f"/v1/fine_tuning/jobs/{ft['id']}").json()["status"] == "queued"


def test_list_pages_and_filters_by_metadata(client):
    ann = make_user(client, "ann")
    train = upload(client, CHAT, ann).json()["id"]
    made = [
        create(client, ann, train, metadata={"team": "a" if i % 2 else "b", "i": str(i)}).json()["id"] for i in range(5)
    ]
    first = client.get("/v1/fine_tuning/jobs", params={"limit": 2}, headers=ann).json()
    assert [j["id"] for j in first["data"]] == made[::-1][:2] and first["has_more"] is True
    rest = client.get("/v1/fine_tuning/jobs", params={"limit": 10, "after": made[3]}, headers=ann).json()
    assert [j["id"] for j in rest["data"]] == made[::-1][2:] and rest["has_more"] is False
    team_a = client.get("/v1/fine_tuning/jobs", params={"metadata[team]": "a"}, headers=ann).json()
    assert [j["id"] for j in team_a["data"]] == [made[3], made[1]]
    both = client.get("/v1/fine_tuning/jobs", params={"metadata[team]": "a", "metadata[i]": "1"}, headers=ann).json()
    assert [j["id"] for j in both["data"]] == [made[1]]
    openai_error(client.get("/v1/fine_tuning/jobs", params={"after": "ftjob-jnothere"}, headers=ann), 400)
    openai_error(client.get("/v1/fine_tuning/jobs", params={"limit": 0}, headers=ann), 400)


def test_cancel(client):
    ann = make_user(client, "ann")
    train = upload(client, CHAT, ann).json()["id"]
    ft = create(client, ann, train).json()
    r = client.post(f"/v1/fine_tuning/jobs/{ft['id']}/cancel", headers=ann)
    assert r.status_code == 200 and r.json()["status"] == "cancelled" and r.json()["finished_at"] is not None
    assert client.get(f"/jobs/{ft['id'].removeprefix('ftjob-')}", headers=ann).json()["state"] == "cancelled"
    err = openai_error(client.post(f"/v1/fine_tuning/jobs/{ft['id']}/cancel", headers=ann), 400)
    assert "already cancelled" in err["message"]
    for action in ("pause", "resume"):
        err = openai_error(client.post(f"/v1/fine_tuning/jobs/{ft['id']}/{action}", headers=ann), 400)
        assert err["code"] == "invalid_state"


def test_a_paused_job_is_not_placed_until_resumed(client, sessions, dispatched):
    ann = make_user(client, "ann")
    train = upload(client, CHAT, ann).json()["id"]
    held = create(client, ann, train).json()  # no box yet: queued
    r = client.post(f"/v1/fine_tuning/jobs/{held['id']}/pause", headers=ann)
    assert r.status_code == 200 and r.json()["status"] == "paused", r.text
    assert client.post(f"/v1/fine_tuning/jobs/{held['id']}/pause", headers=ann).json()["status"] == "paused"
    add_box(sessions, n=1)
    later = create(client, ann, train).json()  # its submission runs the scheduler: the paused job is passed over
    assert later["status"] == "validating_files"
    assert [c[0] for c in dispatched.calls] == [later["id"].removeprefix("ftjob-")]
    client.post(f"/v1/fine_tuning/jobs/{later['id']}/cancel", headers=ann)
    with sessions() as s:  # the worker's part of the cancel: the processes are gone
        from core import lifecycle

        job = s.get(Job, later["id"].removeprefix("ftjob-"))
        lifecycle.cancel(s, job.id, attempt=job.attempt, stopped=True)
        s.commit()
    r = client.post(f"/v1/fine_tuning/jobs/{held['id']}/resume", headers=ann)
    assert r.status_code == 200 and r.json()["status"] == "validating_files", r.text
    assert dispatched.calls[-1][0] == held["id"].removeprefix("ftjob-")
    err = openai_error(client.post(f"/v1/fine_tuning/jobs/{held['id']}/resume", headers=ann), 400)
    assert "not paused" in err["message"]


def test_pausing_a_running_job_gives_back_the_attempt_it_costs(client, sessions):
    ann = make_user(client, "ann")
    ft = create(client, ann, upload(client, CHAT, ann).json()["id"]).json()
    job_id = ft["id"].removeprefix("ftjob-")
    with sessions() as s:
        s.get(Job, job_id).state = "running"
        s.commit()
        before = s.get(Job, job_id).max_attempts
    r = client.post(f"/v1/fine_tuning/jobs/{ft['id']}/pause", headers=ann)
    assert r.json()["status"] == "running", "until its worker has stopped it"
    with sessions() as s:
        job = s.get(Job, job_id)
        assert job.paused_at is not None and job.max_attempts == before + 1 and job.state == "running"
        job.state = "queued"  # as the worker's requeue leaves it
        s.commit()
    assert client.get(f"/v1/fine_tuning/jobs/{ft['id']}", headers=ann).json()["status"] == "paused"


def test_a_file_in_use_is_409(client, sessions):
    ann = make_user(client, "ann")
    train, val = upload(client, CHAT, ann).json()["id"], upload(client, chat_lines(5), ann).json()["id"]
    ft = create(client, ann, train, validation_file=val).json()
    for f in (train, val):
        err = openai_error(client.delete(f"/v1/files/{f}", headers=ann), 409)
        assert ft["id"].removeprefix("ftjob-") in err["message"] and err["code"] == "file_in_use", err
    client.post(f"/v1/fine_tuning/jobs/{ft['id']}/cancel", headers=ann)
    assert client.delete(f"/v1/files/{val}", headers=ann).json()["deleted"] is True


def _finish(sessions, settings, job_id: str, steps: int, state: str = "succeeded") -> None:
    """A run's traces as the worker and trainer leave them: stored metrics, events.jsonl, checkpoints."""
    from datetime import UTC, datetime

    run_dir = settings.run_dir(job_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "events.jsonl").open("w") as f:
        for step in range(1, steps + 1):
            f.write(json.dumps({"type": "step", "step": step, "loss": 3.0 / step, "trained_tokens": 100 * step}) + "\n")
        f.write(json.dumps({"type": "end", "state": state}) + "\n")
    for step in (2, 4):
        (run_dir / "checkpoints" / f"step-{step}").mkdir(parents=True)
        (run_dir / "checkpoints" / f"step-{step}" / "state.pt").write_bytes(b"x" * step)
    with sessions() as s:
        now = time.time()
        for step in range(1, steps + 1):
            eval_loss = 2.0 / step if step % 2 == 0 else None
            s.add(
                JobMetric(job_id=job_id, attempt=1, step=step, loss=3.0 / step, eval_loss=eval_loss, lr=1e-4, time=now)
            )
        job = s.get(Job, job_id)
        job.state, job.total_steps, job.step = state, steps, steps
        job.started_at = job.finished_at = datetime.now(UTC)
        if state == "failed":
            job.error = {"type": "train_error", "message": "loss became nan"}
        s.commit()


def test_events_checkpoints_and_the_results_file(client, sessions, settings):
    ann = make_user(client, "ann")
    train = upload(client, CHAT, ann).json()["id"]
    ft = create(client, ann, train, suffix="sfx").json()
    job_id = ft["id"].removeprefix("ftjob-")
    _finish(sessions, settings, job_id, steps=5)
    events, after = [], None
    while True:
        params = {"limit": 3, **({"after": after} if after else {})}
        page = client.get(f"/v1/fine_tuning/jobs/{ft['id']}/events", params=params, headers=ann).json()
        events += page["data"]
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
    assert [e["message"] for e in events] == [
        "The job has successfully completed",
        "Step 5/5: training loss=0.6000",
        "Step 4/5: training loss=0.7500, validation loss=0.5000",
        "Step 3/5: training loss=1.0000",
        "Step 2/5: training loss=1.5000, validation loss=1.0000",
        "Step 1/5: training loss=3.0000",
        "Fine-tuning job started",
        f"Created fine-tuning job: {ft['id']}",
    ]
    assert {e["object"] for e in events} == {"fine_tuning.job.event"} and len({e["id"] for e in events}) == 8
    step4 = events[2]
    assert step4["type"] == "metrics" and step4["level"] == "info"
    assert step4["data"]["step"] == 4 and step4["data"]["train_loss"] == 0.75 and step4["data"]["valid_loss"] == 0.5
    got = client.get(f"/v1/fine_tuning/jobs/{ft['id']}", headers=ann).json()
    assert got["status"] == "succeeded" and got["trained_tokens"] == 500 and got["finished_at"] is not None
    assert got["fine_tuned_model"] == f"ft:preset:tiny:ann:sfx:{ft['id']}"
    [result] = got["result_files"]
    assert result == f"file-{job_id}"
    meta = client.get(f"/v1/files/{result}", headers=ann).json()
    assert meta["purpose"] == "fine-tune-results" and meta["object"] == "file"
    csv = client.get(f"/v1/files/{result}/content", headers=ann).text
    assert csv.splitlines()[:3] == [
        "step,train_loss,valid_loss,epoch,lr,tokens_per_s",
        "1,3.0,,,0.0001,",
        "2,1.5,1.0,,0.0001,",
    ]
    assert meta["bytes"] == len(csv.encode())
    listed = client.get("/v1/files", params={"purpose": "fine-tune-results"}, headers=ann).json()["data"]
    assert [f["id"] for f in listed] == [result]
    openai_error(client.delete(f"/v1/files/{result}", headers=ann), 400)
    ckpts = client.get(f"/v1/fine_tuning/jobs/{ft['id']}/checkpoints", headers=ann).json()
    assert [c["step_number"] for c in ckpts["data"]] == [4, 2] and ckpts["has_more"] is False
    c4 = ckpts["data"][0]
    assert c4["object"] == "fine_tuning.job.checkpoint" and c4["fine_tuning_job_id"] == ft["id"]
    assert c4["metrics"]["train_loss"] == 0.75 and c4["metrics"]["valid_loss"] == 0.5
    assert c4["fine_tuned_model_checkpoint"] == f"ft:preset:tiny:ann:sfx:{ft['id']}:ckpt-step-4"
    page = client.get(f"/v1/fine_tuning/jobs/{ft['id']}/checkpoints", params={"limit": 1}, headers=ann).json()
    assert [c["step_number"] for c in page["data"]] == [4] and page["has_more"] is True
    nxt = {"after": page["data"][0]["id"]}
    assert [
        c["step_number"]
        for c in client.get(f"/v1/fine_tuning/jobs/{ft['id']}/checkpoints", params=nxt, headers=ann).json()["data"]
    ] == [2]
    openai_error(
        client.get(f"/v1/fine_tuning/jobs/{ft['id']}/events", params={"after": "ftevent-jx-3"}, headers=ann), 400
    )


def test_a_failed_job_carries_its_error(client, sessions, settings):
    ann = make_user(client, "ann")
    train = upload(client, CHAT, ann).json()["id"]
    ft = create(client, ann, train).json()
    _finish(sessions, settings, ft["id"].removeprefix("ftjob-"), steps=2, state="failed")
    got = client.get(f"/v1/fine_tuning/jobs/{ft['id']}", headers=ann).json()
    assert got["status"] == "failed" and got["fine_tuned_model"] is None
    assert got["error"] == {"code": "train_error", "message": "loss became nan", "param": None}
    [end] = client.get(f"/v1/fine_tuning/jobs/{ft['id']}/events", params={"limit": 1}, headers=ann).json()["data"]
    assert end["level"] == "error" and "loss became nan" in end["message"]


def test_submission_limits_apply(client):
    ann = make_user(client, "ann")
    train = upload(client, CHAT, ann).json()["id"]
    assert client.patch("/users/ann", json={"max_queued": 1}).status_code == 200
    assert create(client, ann, train).status_code == 200
    err = openai_error(create(client, ann, train), 403)
    assert err["type"] == "insufficient_quota" and err["code"] == "limit_exceeded", err
    err = openai_error(create(client, ann, train, trainbox={"priority": 5}), 403)
    assert err["param"] == "trainbox.priority" and "max_priority" in err["message"], err
    with client.app.state.sessions() as s:
        assert len(s.scalars(select(Job)).all()) == 1


def test_the_submit_rate_limit_is_a_429_in_the_envelope(client):
    ann = make_user(client, "ann")
    train = upload(client, CHAT, ann).json()["id"]
    assert client.patch("/users/ann", json={"submit_rate_per_minute": 1}).status_code == 200
    assert create(client, ann, train).status_code == 200
    r = create(client, ann, train)
    err = openai_error(r, 429)
    assert err["type"] == "rate_limit_error" and err["code"] == "rate_limit_exceeded", err
    assert int(r.headers["Retry-After"]) >= 1


@pytest.mark.parametrize(
    ("state", "status"),
    [
        ("queued", "queued"),
        ("starting", "validating_files"),
        ("running", "running"),
        ("cancelling", "running"),
        ("succeeded", "succeeded"),
        ("failed", "failed"),
        ("cancelled", "cancelled"),
    ],
)
def test_status_follows_the_job_state(client, sessions, state, status):
    from datetime import UTC, datetime

    ann = make_user(client, "ann")
    ft = create(client, ann, upload(client, CHAT, ann).json()["id"]).json()
    now = time.time()
    with sessions() as s:
        job = s.get(Job, ft["id"].removeprefix("ftjob-"))
        job.state = state
        # Half way after 100 s: the ETA is about 100 s more.
        job.step, job.total_steps, job.latest = 50, 100, {"step": 50, "time": now}
        job.rate_origin = {"step": 0, "time": now - 100}
        job.started_at = datetime.now(UTC)
        s.commit()
    got = client.get(f"/v1/fine_tuning/jobs/{ft['id']}", headers=ann).json()
    assert got["status"] == status
    if state == "running":
        assert abs(got["estimated_finish"] - (now + 100)) <= 3, got
    else:
        assert got["estimated_finish"] is None
