"""Logs and artifacts: tail, listing, download, and no way out of the run directory."""

from __future__ import annotations

import io
import os
import tarfile

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
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "theirs.pt").write_bytes(b"not this job's")
    os.symlink(outside, run / "checkpoints" / "step-40")  # a directory link out of the run dir: not listed
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
    assert arts["checkpoints"][0]["files"] == [{"name": "checkpoints/step-10/mp_rank_00_model_states.pt", "size": 10}]
    # The job itself links to the listing: reading a job never walks its run directory.
    assert client.get(f"/jobs/{job_with_files}").json()["artifacts"] == {"href": f"/jobs/{job_with_files}/artifacts"}


def test_artifact_download(client, job_with_files):
    r = client.get(f"/jobs/{job_with_files}/artifacts/model/config.json")
    assert r.status_code == 200 and r.json() == {"model_type": "llama"}
    r = client.get(f"/jobs/{job_with_files}/artifacts/checkpoints/step-10/mp_rank_00_model_states.pt")
    assert r.status_code == 200 and r.content == b"x" * 10


def _tar_members(data: bytes) -> dict[str, bytes | None]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return {m.name: tar.extractfile(m).read() if m.isfile() else None for m in tar.getmembers()}


def test_every_listed_artifact_downloads_with_its_content(client, settings, tmp_path):
    """A checkpoint is listed by its directory's name: GET of it is a tar of the directory (what a
    resume or zero_to_fp32 needs), and each file in it is listed and downloads on its own."""
    job_id = client.post("/jobs", json=spec()).json()["id"]
    run = settings.run_dir(job_id)
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text('{"model_type": "llama"}')
    big = os.urandom(3 * (1 << 20) + 17)  # several stream chunks, not a multiple of the tar block
    ckpt = run / "checkpoints" / "step-2"
    (ckpt / "global_step2").mkdir(parents=True)
    (ckpt / "global_step2" / "mp_rank_00_model_states.pt").write_bytes(big)
    (ckpt / "global_step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"o" * 700)
    (ckpt / "trainbox.json").write_text('{"step": 2}')
    (ckpt / "empty.bin").write_bytes(b"")
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    os.symlink(secret, ckpt / "leak.txt")  # not listed, not in the tar
    os.symlink(tmp_path, ckpt / "leakdir")

    arts = client.get(f"/jobs/{job_id}/artifacts").json()
    [listed] = arts["checkpoints"]
    assert listed["name"] == "checkpoints/step-2" and listed["size"] == len(big) + 700 + len('{"step": 2}')
    names = [a["name"] for a in arts["model"]] + [f["name"] for f in listed["files"]]
    assert sorted(names) == [
        "checkpoints/step-2/empty.bin",
        "checkpoints/step-2/global_step2/mp_rank_00_model_states.pt",
        "checkpoints/step-2/global_step2/zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "checkpoints/step-2/trainbox.json",
        "model/config.json",
    ]
    for name in names:
        r = client.get(f"/jobs/{job_id}/artifacts/{name}")
        assert r.status_code == 200 and r.content == (run / name).read_bytes(), name

    r = client.get(f"/jobs/{job_id}/artifacts/checkpoints/step-2")
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-tar"
    assert r.headers["content-disposition"] == 'attachment; filename="step-2.tar"'
    assert int(r.headers["content-length"]) == len(r.content)
    members = _tar_members(r.content)
    assert members == {
        "step-2": None,
        "step-2/empty.bin": b"",
        "step-2/global_step2": None,
        "step-2/global_step2/mp_rank_00_model_states.pt": big,
        "step-2/global_step2/zero_pp_rank_0_mp_rank_00_optim_states.pt": b"o" * 700,
        "step-2/trainbox.json": b'{"step": 2}',
    }


def test_a_checkpoint_pruned_during_its_download_still_arrives_whole(client, settings):
    """The files are opened before the first byte is sent: the trainer's pruning (rmtree of old
    checkpoints) while a download streams does not cut it short."""
    import shutil

    job_id = client.post("/jobs", json=spec()).json()["id"]
    ckpt = settings.run_dir(job_id) / "checkpoints" / "step-1"
    ckpt.mkdir(parents=True)
    for i in range(3):
        (ckpt / f"part-{i}.pt").write_bytes(bytes([i]) * (2 << 20))
    with client.stream("GET", f"/jobs/{job_id}/artifacts/checkpoints/step-1") as r:
        assert r.status_code == 200
        chunks = r.iter_bytes()
        first = next(chunks)
        shutil.rmtree(ckpt)
        data = first + b"".join(chunks)
    assert {k: v for k, v in _tar_members(data).items() if v} == {
        f"step-1/part-{i}.pt": bytes([i]) * (2 << 20) for i in range(3)
    }


@pytest.mark.parametrize(
    "name",
    [
        "spec.json",  # in the run dir but not an artifact
        "train.log",
        "model",  # a directory that is not listed
        "checkpoints",
        "checkpoints/step-30.tmp",  # incomplete
        "checkpoints/step-40",  # a link out of the run dir
        "checkpoints/step-40/theirs.pt",
        "checkpoints/step-10/",
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


def test_a_checkpoint_pruned_before_its_files_are_open_is_not_a_partial_archive(tmp_path):
    from api.artifacts import TarStream

    with pytest.raises(FileNotFoundError):
        TarStream(tmp_path / "step-5")  # gone between the listing check and the archive: the route says 404
