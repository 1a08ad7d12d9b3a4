"""Disk through the API: a job's disk_bytes (stored, never measured per request), a user's totals in
/users/me and /users, the disk quota at submission (setting and per-user override), and the admins'
POST /admin/prune."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import update

from core.models import Job, utcnow
from tests.api.conftest import make_user, spec
from tests.api.test_datasets import JSONL, upload
from tests.api.test_jobs import only_error

pytestmark = pytest.mark.usefixtures("clean_uploads")


def _submit(client, headers=None) -> str:
    r = client.post("/jobs", json=spec(), headers=headers or {})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _set(sessions, job_id: str, **values) -> None:
    with sessions() as s:
        s.execute(update(Job).where(Job.id == job_id).values(**values))
        s.commit()


def test_a_job_shows_the_disk_bytes_the_worker_stored(client, sessions, settings):
    job_id = _submit(client)
    assert client.get(f"/jobs/{job_id}").json()["disk_bytes"] is None  # not measured yet
    run_dir = settings.run_dir(job_id)
    (run_dir / "checkpoints" / "step-10").mkdir(parents=True)
    (run_dir / "checkpoints" / "step-10" / "shard.pt").write_bytes(b"x" * 5000)
    _set(sessions, job_id, disk_bytes=21 << 30)
    # The stored figure, not the run directory's size: reading a job does not walk the disk for it.
    assert client.get(f"/jobs/{job_id}").json()["disk_bytes"] == 21 << 30
    assert client.get("/jobs").json()["data"][0]["disk_bytes"] == 21 << 30


def test_users_me_adds_up_the_callers_jobs_and_uploads(client, sessions):
    ann, bob = make_user(client, "ann"), make_user(client, "bob")
    first, second = _submit(client, ann), _submit(client, ann)
    _set(sessions, first, disk_bytes=3000)
    _set(sessions, second, disk_bytes=4000)
    _set(sessions, _submit(client, bob), disk_bytes=999_999)
    _submit(client, ann)  # queued, never measured: counts nothing
    assert upload(client, JSONL, ann).status_code == 201
    disk = client.get("/users/me", headers=ann).json()["disk"]
    assert disk == {"jobs_bytes": 7000, "uploads_bytes": len(JSONL), "total_bytes": 7000 + len(JSONL)}
    assert client.get("/users/me", headers=bob).json()["disk"]["total_bytes"] == 999_999
    everyone = {u["name"]: u["disk"] for u in client.get("/users").json()}  # the admin's view
    assert everyone["ann"] == disk and everyone["local"]["total_bytes"] == 0


def test_a_user_at_their_disk_quota_cannot_submit_until_an_override_or_a_prune(client, sessions, settings, monkeypatch):
    ann = make_user(client, "ann")
    assert client.get("/users/me", headers=ann).json()["limits"]["max_disk_bytes"] is None  # default: no cap
    job_id = _submit(client, ann)
    _set(sessions, job_id, disk_bytes=6000, state="succeeded", finished_at=utcnow() - timedelta(days=1))

    monkeypatch.setattr(settings, "max_disk_bytes_per_user", 6000)  # at the quota: refused
    client.app.state.auth_cache.clear()  # a settings change comes with a restart; the cache holds limits
    assert client.get("/users/me", headers=ann).json()["limits"]["max_disk_bytes"] == 6000
    [err] = only_error(client.post("/jobs", json=spec(), headers=ann), 403)
    assert err["type"] == "limit_exceeded" and err["loc"] == ["body"]
    msg = err["msg"]
    for fragment in (
        "you use 6.0 KB (6000 bytes) of disk",
        "6000 bytes in your jobs' run directories",
        "quota of 6.0 KB (6000 bytes)",
        "max_disk_bytes",
        "TRAINBOX_MAX_DISK_BYTES_PER_USER",
        "trainbox-admin users set NAME --max-disk-bytes N",
        "trainbox prune",
        "trainbox datasets delete",
    ):
        assert fragment in msg, msg
    assert client.post("/jobs", json=spec()).status_code == 201, "others (the admin `local`) still submit"

    assert client.patch("/users/ann", json={"max_disk_bytes": 6001}).status_code == 200  # an override wins
    assert client.get("/users/me", headers=ann).json()["limits"]["max_disk_bytes"] == 6001
    assert client.post("/jobs", json=spec(), headers=ann).status_code == 201

    assert client.patch("/users/ann", json={"max_disk_bytes": None}).status_code == 200  # back to the setting
    assert only_error(client.post("/jobs", json=spec(), headers=ann), 403)
    (settings.run_dir(job_id) / "checkpoints" / "step-1").mkdir(parents=True)
    (settings.run_dir(job_id) / "checkpoints" / "step-1" / "shard.pt").write_bytes(b"x" * 6000)
    pruned = client.post("/admin/prune", json={"older_than_days": 0}).json()
    assert [j["id"] for j in pruned["jobs"]] == [job_id] and pruned["bytes_freed"] == 6000
    assert client.get(f"/jobs/{job_id}", headers=ann).json()["disk_bytes"] == 0
    assert client.post("/jobs", json=spec(), headers=ann).status_code == 201, "pruning made room"


def test_admin_prune_dry_run_then_real_keeps_models_and_running_jobs(client, sessions, settings, monkeypatch):
    old = utcnow() - timedelta(days=30)
    done, running = _submit(client), _submit(client)
    _set(sessions, done, state="succeeded", finished_at=old, disk_bytes=1)
    _set(sessions, running, state="running", started_at=old)
    for job_id in (done, running):
        ckpt = settings.run_dir(job_id) / "checkpoints" / "step-5"
        ckpt.mkdir(parents=True)
        (ckpt / "shard.pt").write_bytes(b"x" * 2500)
        (settings.run_dir(job_id) / "model").mkdir()
        (settings.run_dir(job_id) / "model" / "config.json").write_text("{}")

    dry = client.post("/admin/prune", json={"older_than_days": 7, "dry_run": True})
    assert dry.status_code == 200, dry.text
    body = dry.json()
    assert body["dry_run"] is True and body["older_than_days"] == 7 and body["bytes_freed"] == 2500
    assert [(j["id"], j["checkpoints"], j["bytes"]) for j in body["jobs"]] == [(done, ["checkpoints/step-5"], 2500)]
    assert (settings.run_dir(done) / "checkpoints" / "step-5").is_dir()

    monkeypatch.setattr(settings, "checkpoint_retention_days", 7.0)  # no body: the retention setting
    real = client.post("/admin/prune")
    assert real.status_code == 200, real.text
    assert real.json()["dry_run"] is False and real.json()["bytes_freed"] == 2500
    assert not (settings.run_dir(done) / "checkpoints").exists()
    assert (settings.run_dir(done) / "model" / "config.json").is_file()
    assert (settings.run_dir(running) / "checkpoints" / "step-5" / "shard.pt").is_file()
    assert client.get(f"/jobs/{done}").json()["disk_bytes"] == 2  # model/config.json, measured again
    assert client.post("/admin/prune", json={"dry_run": True}).json()["jobs"] == []


def test_prune_is_for_admins_and_needs_an_age(client):
    ann = make_user(client, "ann")
    [err] = only_error(client.post("/admin/prune", json={"older_than_days": 1}, headers=ann), 403)
    assert "admin" in err["msg"]
    [err] = only_error(client.post("/admin/prune", json={}), 422)  # no setting, no age: nothing assumed
    assert err["loc"] == ["body", "older_than_days"] and "TRAINBOX_CHECKPOINT_RETENTION_DAYS" in err["msg"]
    assert err["type"] == "retention_not_set"  # documented on the operation: no JSON schema can say it
    bad_bodies = (
        {"older_than_days": -1},
        {"older_than_days": False},
        {"older_than_days": "7"},
        {"dry_run": "yes"},
        {"dry_run": 1},
        {"older_than_days": 1, "force": True},
    )
    for bad in bad_bodies:
        assert client.post("/admin/prune", json=bad).status_code == 422, bad


def test_prune_deletes_token_cache_entries_no_job_used_for_n_days(client, settings):
    import os
    import time

    from trainer.tokencache import TOKEN_CACHE_DIR

    cache = settings.data_root / TOKEN_CACHE_DIR
    cache.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for key, days in (("unused", 30), ("recent", 1)):
        for part in ("train.npy", "json"):
            f = cache / f"data-{key}.{part}"
            f.write_bytes(b"x" * 1000)
            os.utime(f, (now - days * 86400, now - days * 86400))
    try:
        dry = client.post("/admin/prune", json={"older_than_days": 7, "dry_run": True}).json()
        assert dry["token_cache"] == {"entries": 1, "bytes": 2000} and dry["bytes_freed"] >= 2000
        assert (cache / "data-unused.json").exists()
        real = client.post("/admin/prune", json={"older_than_days": 7}).json()
        assert real["token_cache"] == {"entries": 1, "bytes": 2000}
        assert sorted(p.name for p in cache.iterdir()) == ["data-recent.json", "data-recent.train.npy"]
    finally:
        for p in cache.iterdir():
            p.unlink()
