"""Logs and artifacts: tail, listing, download, and no way out of the run directory."""

from __future__ import annotations

import os

import pytest

from tests.api.conftest import spec
from tests.api.test_jobs import only_error


@pytest.fixture
def job_with_files(client, settings, tmp_path):
    job_id = client.post("/jobs", json=spec()).json()["id"]
    run = settings.run_dir(job_id)
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text('{"model_type": "llama"}')
    (run / "model" / "model.safetensors").write_bytes(b"\0" * 1000)
    for step in (20, 10):
        ckpt = run / "checkpoints" / f"step-{step}"
        ckpt.mkdir(parents=True)
        (ckpt / "mp_rank_00_model_states.pt").write_bytes(b"x" * step)
    (run / "checkpoints" / "step-30.tmp").mkdir()  # incomplete: not listed
    (run / "train.log").write_text("".join(f"[rank 0] line {i}\n" for i in range(1, 1001)))
    (run / "spec.json").write_text("{}")
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    os.symlink(secret, run / "model" / "leak.txt")
    return job_id


def test_logs_tail_and_whole(client, job_with_files):
    r = client.get(f"/jobs/{job_with_files}/logs", params={"tail": 3})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert r.text == "[rank 0] line 998\n[rank 0] line 999\n[rank 0] line 1000\n"
    whole = client.get(f"/jobs/{job_with_files}/logs").text
    assert whole.count("\n") == 1000
    only_error(client.get(f"/jobs/{job_with_files}/logs", params={"tail": 0}), 422)


def test_logs_before_start_are_empty(client):
    job_id = client.post("/jobs", json=spec()).json()["id"]
    r = client.get(f"/jobs/{job_id}/logs", params={"tail": 10})
    assert r.status_code == 200 and r.text == ""


def test_artifact_listing(client, job_with_files):
    arts = client.get(f"/jobs/{job_with_files}/artifacts").json()
    assert [a["name"] for a in arts["model"]] == ["model/config.json", "model/model.safetensors"]
    assert arts["model"][1]["size"] == 1000
    assert [(c["name"], c["step"], c["size"]) for c in arts["checkpoints"]] == [
        ("checkpoints/step-10", 10, 10),
        ("checkpoints/step-20", 20, 20),
    ]
    assert client.get(f"/jobs/{job_with_files}").json()["artifacts"] == arts


def test_artifact_download(client, job_with_files):
    r = client.get(f"/jobs/{job_with_files}/artifacts/model/config.json")
    assert r.status_code == 200 and r.json() == {"model_type": "llama"}
    r = client.get(f"/jobs/{job_with_files}/artifacts/checkpoints/step-10/mp_rank_00_model_states.pt")
    assert r.status_code == 200 and r.content == b"x" * 10


@pytest.mark.parametrize(
    "name",
    [
        "spec.json",  # in the run dir but not an artifact
        "train.log",
        "model",  # a directory
        "model/leak.txt",  # a symlink out of the run dir
        "model/..%2F..%2Fspec.json",
        "model%2F..%2F..%2F..%2Fetc%2Fpasswd",
        "checkpoints/step-10/..%2F..%2F..%2Fspec.json",
        "%2Fetc%2Fpasswd",
        "model/missing.bin",
    ],
)
def test_no_path_traversal(client, job_with_files, name):
    [err] = only_error(client.get(f"/jobs/{job_with_files}/artifacts/{name}"), 404)
    assert err["type"] == "not_found"


def test_files_of_unknown_job_are_404(client):
    for path in ("logs", "artifacts", "artifacts/model/config.json"):
        only_error(client.get(f"/jobs/j0000000000000000/{path}"), 404)
