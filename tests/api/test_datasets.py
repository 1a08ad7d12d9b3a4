"""POST /datasets (multipart upload, checked line by line, size-capped), GET /datasets, and specs
that name an upload by id: only its owner may train on it."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select

from core.models import Dataset, Job
from tests.api.conftest import make_user, spec
from tests.api.test_jobs import only_error
from trainer.paths import uploaded_dataset_path

pytestmark = pytest.mark.usefixtures("clean_uploads")
JSONL = "".join(json.dumps({"text": f"line {i} " * 10}) + "\n" for i in range(50)).encode()


def upload(client, content: bytes, headers=None, filename="train.jsonl", **form):
    return client.post("/datasets", files={"file": (filename, content)}, data=form, headers=headers or {})


def stored(sessions, settings) -> tuple[int, list[str]]:
    with sessions() as s:
        rows = s.scalar(select(func.count()).select_from(Dataset)) or 0
    uploads = settings.data_root / "uploads"
    return rows, sorted(p.name for p in uploads.iterdir()) if uploads.is_dir() else []


def test_upload_list_and_train_on_it(client, sessions, settings):
    ann = make_user(client, "ann")
    r = upload(client, JSONL, ann, filename="../../etc/my data.jsonl")
    assert r.status_code == 201, r.text
    ds = r.json()
    assert ds["id"].startswith("d") and ds["format"] == "jsonl" and ds["records"] == 50
    assert ds["bytes"] == len(JSONL) and ds["filename"] == "my_data.jsonl" and ds["text_field"] == "text"
    path = uploaded_dataset_path(settings.data_root, ds["id"])
    assert path.read_bytes() == JSONL
    assert [d["id"] for d in client.get("/datasets", headers=ann).json()["data"]] == [ds["id"]]
    job = client.post("/jobs", json=spec(dataset={"id": ds["id"]}), headers=ann)
    assert job.status_code == 201 and job.json()["spec"]["dataset"]["id"] == ds["id"]
    text = upload(client, b"plain words\nmore words\n", ann, filename="notes.txt").json()
    assert text["format"] == "text" and text["records"] == 2


def test_only_the_owner_may_use_or_list_an_upload(client, sessions):
    ann, bob = make_user(client, "ann"), make_user(client, "bob")
    ds = upload(client, JSONL, ann).json()
    assert client.get("/datasets", headers=bob).json()["data"] == []
    [err] = only_error(client.post("/jobs", json=spec(dataset={"id": ds["id"]}), headers=bob), 422)
    assert err["loc"] == ["body", "dataset", "id"] and err["msg"] == f"no uploaded dataset with id {ds['id']!r}"
    only_error(client.post("/jobs/validate", json=spec(dataset={"id": ds["id"]}), headers=bob), 422)
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 0


@pytest.mark.parametrize(
    ("content", "form", "loc", "fragment"),
    [
        (b'{"text": "ok"}\n{not json\n', {}, ["body", "file"], "line 2 is not valid JSON"),
        (b'{"body": "x"}\n', {}, ["body", "text_field"], "no text field 'text'"),
        (b'{"body": "x"}\n', {"text_field": "content"}, ["body", "text_field"], "no text field 'content'"),
        (b"caf\xe9 latin-1\n", {}, ["body", "file"], "line 1 is not UTF-8"),
        (b"\n\n  \n", {}, ["body", "file"], "dataset is empty"),
        (b'{"text": 5}\n', {}, ["body", "file"], "is not a string"),
        (b"plain\n", {"format": "jsonl"}, ["body", "file"], "not valid JSON"),
    ],
)
def test_bad_uploads_are_422_and_leave_nothing(client, sessions, settings, content, form, loc, fragment):
    [err] = only_error(upload(client, content, **form), 422)
    assert err["loc"] == loc and fragment in err["msg"], err
    assert stored(sessions, settings) == (0, [])


def test_upload_over_the_cap_is_413_and_leaves_nothing(client, sessions, settings):
    big = JSONL * (settings.max_upload_bytes // len(JSONL) + 2)
    [err] = only_error(upload(client, big), 413)
    assert err["type"] == "too_large" and str(settings.max_upload_bytes) in err["msg"]

    def chunks():  # no Content-Length: counted while it arrives
        head = b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.jsonl"\r\n\r\n'
        body = head + big + b"\r\n--b--\r\n"
        for i in range(0, len(body), 65536):
            yield body[i : i + 65536]

    r = client.post("/datasets", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    only_error(r, 413)
    assert stored(sessions, settings) == (0, [])


def test_upload_form_errors(client, sessions, settings):
    only_error(client.post("/datasets"), 422)
    only_error(upload(client, JSONL, format="parquet"), 422)
    assert stored(sessions, settings) == (0, [])


def test_an_upload_cannot_be_reached_by_path(client, sessions, settings, tmp_path):
    import os

    ds = upload(client, JSONL, make_user(client, "ann")).json()
    bob = make_user(client, "bob")
    link = settings.data_root / "corpus" / "via-link.jsonl"
    os.symlink(uploaded_dataset_path(settings.data_root, ds["id"]), link)
    try:
        for path in (f"uploads/{ds['id']}", "corpus/via-link.jsonl"):
            [err] = only_error(client.post("/jobs", json=spec(dataset={"path": path}), headers=bob), 422)
            assert err["loc"] == ["body", "dataset", "path"] and "name an upload by its id" in err["msg"], err
    finally:
        link.unlink()
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 0


def _mode(path) -> int:
    import stat

    return stat.S_IMODE(path.stat().st_mode)


def test_uploads_are_private_to_the_service_user(client, settings):
    """The uploads directory is 0700 and each upload 0600, whatever the umask (others on the box
    cannot read someone's training data)."""
    import os

    old = os.umask(0o022)
    try:
        ds = upload(client, JSONL, make_user(client, "ann")).json()
    finally:
        os.umask(old)
    assert _mode(settings.data_root / "uploads") == 0o700
    assert _mode(uploaded_dataset_path(settings.data_root, ds["id"])) == 0o600


def test_upload_count_quota_per_user(client, sessions, settings):
    ann, bob = make_user(client, "ann"), make_user(client, "bob")
    assert client.patch("/users/ann", json={"max_datasets": 2}).status_code == 200
    first = upload(client, JSONL, ann).json()
    upload(client, JSONL, ann)
    [err] = only_error(upload(client, JSONL, ann), 403)
    assert err["type"] == "limit_exceeded" and "you have 2 uploaded datasets" in err["msg"], err
    assert "TRAINBOX_MAX_DATASETS_PER_USER" in err["msg"] and "--max-datasets" in err["msg"]
    assert stored(sessions, settings)[0] == 2
    assert upload(client, JSONL, bob).status_code == 201, "per user"
    assert client.delete(f"/datasets/{first['id']}", headers=ann).status_code == 204
    assert upload(client, JSONL, ann).status_code == 201, "deleting one makes room"


def test_upload_bytes_quota_per_user(client, sessions, settings):
    ann = make_user(client, "ann")
    assert client.patch("/users/ann", json={"max_dataset_bytes": 2 * len(JSONL) + 10}).status_code == 200
    assert client.get("/users/me", headers=ann).json()["limits"]["max_dataset_bytes"] == 2 * len(JSONL) + 10
    upload(client, JSONL, ann)
    upload(client, JSONL, ann)
    [err] = only_error(upload(client, JSONL, ann), 403)
    assert err["type"] == "limit_exceeded" and f"{2 * len(JSONL)} in use" in err["msg"], err
    assert "TRAINBOX_MAX_DATASET_BYTES_PER_USER" in err["msg"]
    assert upload(client, b"tiny\n", ann).status_code == 201, "what still fits is accepted"
    assert stored(sessions, settings)[0] == 3 and len(stored(sessions, settings)[1]) == 3, "no part file left"


def test_delete_an_upload(client, sessions, settings):
    ann, bob = make_user(client, "ann"), make_user(client, "bob")
    ds = upload(client, JSONL, ann).json()
    path = uploaded_dataset_path(settings.data_root, ds["id"])
    [err] = only_error(client.delete(f"/datasets/{ds['id']}", headers=bob), 404)
    assert err["msg"] == f"no uploaded dataset with id {ds['id']!r}" and path.is_file()
    assert client.delete(f"/datasets/{ds['id']}", headers=ann).status_code == 204
    assert not path.exists() and stored(sessions, settings) == (0, [])
    assert client.get("/datasets", headers=ann).json()["data"] == []
    only_error(client.delete(f"/datasets/{ds['id']}", headers=ann), 404)
    only_error(client.delete("/datasets/d000", headers=ann), 404)
    only_error(client.delete("/datasets/..%2Fcorpus", headers=ann), 404)
    only_error(client.delete("/datasets/D-1.x", headers=ann), 422)


@pytest.mark.parametrize("state", ["queued", "starting", "running", "cancelling"])
def test_an_upload_in_use_by_an_unfinished_job_is_409(client, sessions, settings, state):
    ann = make_user(client, "ann")
    ds = upload(client, JSONL, ann).json()
    job = client.post("/jobs", json=spec(dataset={"id": ds["id"]}), headers=ann).json()
    with sessions() as s:
        s.get(Job, job["id"]).state = state
        s.commit()
    [err] = only_error(client.delete(f"/datasets/{ds['id']}", headers=ann), 409)
    assert err["type"] == "conflict" and job["id"] in err["msg"] and state in err["msg"], err
    assert uploaded_dataset_path(settings.data_root, ds["id"]).is_file()
    with sessions() as s:
        s.get(Job, job["id"]).state = "failed"
        s.commit()
    assert client.delete(f"/datasets/{ds['id']}", headers=ann).status_code == 204
    assert client.get(f"/jobs/{job['id']}", headers=ann).json()["spec"]["dataset"]["id"] == ds["id"], "history kept"


CHAT = "".join(
    json.dumps({"messages": [{"role": "user", "content": f"q {i}"}, {"role": "assistant", "content": f"a {i}"}]}) + "\n"
    for i in range(40)
).encode()
PROMPTS = "".join(json.dumps({"prompt": f"q {i}", "completion": f" a {i}"}) + "\n" for i in range(40)).encode()


@pytest.mark.parametrize(("content", "fmt"), [(CHAT, "chat"), (PROMPTS, "prompt_completion"), (JSONL, "jsonl")])
def test_an_upload_records_the_format_it_was_checked_as(client, content, fmt):
    """The stored format is what a spec reads the file as: submission reports the data from it."""
    ds = upload(client, content)
    assert ds.status_code == 201, ds.text
    assert ds.json()["format"] == fmt and ds.json()["records"] == content.count(b"\n")
    r = client.post("/jobs/validate", json=spec(dataset={"id": ds.json()["id"]}))
    assert r.status_code == 200, r.text
    train = r.json()["data"]["train"]
    assert train["data_format"] == ("text" if fmt == "jsonl" else fmt) and train["file_format"] == "jsonl", train
    assert train["records"] == content.count(b"\n")


@pytest.mark.parametrize(
    ("content", "form", "fragment"),
    [
        (CHAT + b'{"messages": [{"role": "user", "content": "q"}]}\n', {}, "line 41 has no assistant message"),
        (CHAT + b'{"messages": [{"role": "function", "content": "x"}]}\n', {}, "line 41 message 0 has role 'function'"),
        (PROMPTS + b'{"prompt": "q"}\n', {}, "line 41 has no 'completion' field"),
        (PROMPTS, {"format": "chat"}, "line 1 has no 'messages' list"),
        (JSONL, {"format": "prompt_completion"}, "line 1 has no 'prompt' field"),
    ],
)
def test_a_bad_record_anywhere_in_an_upload_is_named(client, sessions, settings, content, form, fragment):
    [err] = only_error(upload(client, content, **form), 422)
    assert err["loc"] == ["body", "file"] and fragment in err["msg"], err
    assert stored(sessions, settings) == (0, [])
