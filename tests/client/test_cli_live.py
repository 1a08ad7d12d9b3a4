"""The CLI against a served API (SQLite, real Redis on DB 6): one line and its own exit code for each
expected failure, the hints on a 422, `validate`, `download`, the queue ETA, the gpus column, `login`."""

from __future__ import annotations

import io
import json
import os
import socket
import tarfile
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from client import cli_common as cc
from client.cli import app
from client.cli_download import extract_tar
from core.models import Job, utcnow
from core.settings import get_settings
from tests.client import test_cli_jobs

REDIS_URL = test_cli_jobs.REDIS_URL
served = test_cli_jobs.served  # the fixture: the API on a real socket (SQLite, Redis DB 6)
_user = test_cli_jobs._user  # a user and its token

runner = CliRunner()


def tb(*args: str, code: int = 0, env: dict[str, str] | None = None, input: str | None = None):
    result = runner.invoke(app, list(args), env=env, input=input)
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def one_line_error(result) -> str:
    """The failure's message: one `error:` line on stderr, nothing on stdout, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    return lines[0]


def _job(owner: str, state: str, **fields) -> str:
    from core.db import session_scope

    with session_scope() as s:
        job = Job(name="j", owner=owner, state=state, spec={"name": "j"}, gpus=2, priority=0, **fields)
        s.add(job)
        s.commit()
        return job.id


def _spec(tmp_path: Path, **fields) -> Path:
    body = {
        "name": "tiny",
        "model": "preset:tiny",
        "dataset": {"path": "corpus.jsonl"},
        "gpus": 1,
        "seq_len": 16,
        "max_steps": 4,
        "deepspeed": {"train_batch_size": 2},
        **fields,
    }
    path = tmp_path / f"spec-{len(list(tmp_path.glob('spec-*')))}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def test_expected_failures_are_one_line_with_their_exit_code(served, tmp_path):
    url, settings = served
    token = _user("ann")
    api = ("--url", url, "--token", token)

    missing = tb(*api, "status", "j-nope", code=cc.EXIT_NOT_FOUND)
    assert "HTTP 404" in one_line_error(missing)

    wrong = tb("--url", url, "status", "j-nope", code=cc.EXIT_AUTH, env={"TRAINBOX_TOKEN": "tbx_wrong"})
    assert "HTTP 401" in one_line_error(wrong) and "token from TRAINBOX_TOKEN" in wrong.stderr

    # A typo in a field: the server's 422 names it, the CLI finds the field meant.
    typo = tb(*api, "submit", str(_spec(tmp_path, modle="preset:tiny", chekpoint_every=2)), code=cc.EXIT_INVALID)
    line = one_line_error(typo)
    assert "modle" in line and "did you mean 'model'?" in line and "did you mean 'checkpoint_every'?" in line
    ds_typo = _spec(tmp_path, deepspeed={"train_batch_size": 2, "zero_optimisation": {"stage": 1}})
    assert "did you mean 'zero_optimization'?" in one_line_error(tb(*api, "validate", str(ds_typo), code=8))

    # A dataset path the server does not have: the way to send a local file.
    nowhere = tb(*api, "validate", str(_spec(tmp_path)), code=cc.EXIT_INVALID)
    assert "trainbox datasets upload corpus.jsonl" in one_line_error(nowhere)

    assert "is not an http:// or https:// URL; did you mean http://127.0.0.1:9?" in one_line_error(
        tb("--url", "127.0.0.1:9", "list", code=cc.EXIT_BAD_URL)
    )


def test_unreachable_and_timeout(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = tb("--url", f"http://127.0.0.1:{port}", "list", code=cc.EXIT_UNREACHABLE)
    assert f"cannot reach http://127.0.0.1:{port} (from --url): connection refused" in one_line_error(down)
    default = tb("list", code=cc.EXIT_UNREACHABLE, env={"TRAINBOX_URL": f"http://127.0.0.1:{port}"})
    assert "(from TRAINBOX_URL)" in one_line_error(default)

    with socket.socket() as mute:  # accepts connections (the kernel's backlog), never answers
        mute.bind(("127.0.0.1", 0))
        mute.listen(8)
        url = f"http://127.0.0.1:{mute.getsockname()[1]}"
        slow = tb("--url", url, "--timeout", "0.3", "status", "j1", code=cc.EXIT_TIMEOUT)
        assert "did not answer within 0.3s" in one_line_error(slow)


def test_validate_prints_the_dry_run(served, tmp_path):
    url, settings = served
    token = _user("ann")
    Path(settings.data_root).mkdir(parents=True, exist_ok=True)
    (Path(settings.data_root) / "corpus.jsonl").write_text('{"text": "hello there, general kenobi"}\n' * 50)
    out = tb("--url", url, "--token", token, "validate", str(_spec(tmp_path)), "--config").stdout
    assert "valid" in out and "batch        2 = micro" in out and "queue" in out and "memory" in out
    assert '"train_batch_size": 2' in out  # the resolved DeepSpeed config
    assert "train data   jsonl (text), 50 records, ~" in out  # the server's data report


def _tar_of(top: str, files: dict[str, bytes], extra: list[tarfile.TarInfo] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info)
    return buf.getvalue()


def test_download_a_checkpoint_and_the_model(served, tmp_path):
    url, settings = served
    token = _user("ann")
    job_id = _job("ann", "succeeded", finished_at=utcnow())
    run_dir = settings.run_dir(job_id)
    (run_dir / "checkpoints" / "step-2" / "global_step2").mkdir(parents=True)
    (run_dir / "checkpoints" / "step-2" / "global_step2" / "mp_rank_00_model_states.pt").write_bytes(b"w" * 5000)
    (run_dir / "checkpoints" / "step-2" / "latest").write_text("global_step2")
    (run_dir / "model").mkdir()
    (run_dir / "model" / "config.json").write_text('{"model_type": "llama"}')
    (run_dir / "model" / "model.safetensors").write_bytes(b"m" * 300)
    api = ("--url", url, "--token", token)

    listed = tb(*api, "download", job_id, "--list").stdout
    assert "checkpoints/step-2" in listed and f"trainbox download {job_id} --checkpoint step-2" in listed
    out = tmp_path / "got"
    tb(*api, "download", job_id, "--checkpoint", "2", "-o", str(out))
    got = out / "step-2" / "global_step2" / "mp_rank_00_model_states.pt"
    assert got.read_bytes() == b"w" * 5000 and (out / "step-2" / "latest").read_text() == "global_step2"
    assert [p.name for p in out.iterdir()] == ["step-2"]  # no temporary directory left
    again = tb(*api, "download", job_id, "--checkpoint", "step-2", "-o", str(out), code=cc.EXIT_USAGE)
    assert "exists already" in one_line_error(again)
    nope = tb(*api, "download", job_id, "--checkpoint", "step-9", "-o", str(out), code=cc.EXIT_NOT_FOUND)
    assert "no checkpoint step-9; its checkpoints: step-2" in one_line_error(nope)

    tb(*api, "download", job_id, "-o", str(out))
    assert (out / "model" / "config.json").read_text() == '{"model_type": "llama"}'
    assert (out / "model" / "model.safetensors").stat().st_size == 300


def test_a_checkpoint_archive_cannot_write_outside_its_folder(tmp_path):
    escape = tarfile.TarInfo("step-1/../../evil")
    escape.size = 0
    link = tarfile.TarInfo("step-1/link")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    for bad in ([escape], [link]):
        with pytest.raises(tarfile.TarError):
            extract_tar(iter([_tar_of("step-1", {"ok": b"1"}, bad)]), tmp_path / "out", "step-1")
        assert not (tmp_path / "evil").exists() and not (tmp_path / "out" / "step-1").exists()
    with pytest.raises(tarfile.TarError):  # another top folder
        extract_tar(iter([_tar_of("step-2", {"ok": b"1"})]), tmp_path / "out", "step-1")
    with pytest.raises(tarfile.TarError):  # cut short
        extract_tar(iter([_tar_of("step-1", {"ok": b"1" * 5000})[:3000]]), tmp_path / "out", "step-1")
    assert list((tmp_path / "out").iterdir()) == []
    chunks = _tar_of("step-1", {"a/b": b"x" * 70000})
    extract_tar(iter([chunks[i : i + 1000] for i in range(0, len(chunks), 1000)]), tmp_path / "out", "step-1")
    assert (tmp_path / "out" / "step-1" / "a" / "b").read_bytes() == b"x" * 70000


def test_queue_and_status_show_the_start_eta_and_gpu_ids(served):
    url, _ = served
    token = _user("ann")
    api = ("--url", url, "--token", token)
    waiting = _job("ann", "queued", queue_position=1, start_eta_at=utcnow() + timedelta(seconds=725))
    running = _job("ann", "running", gpu_ids=[0, 1], box="box1", started_at=utcnow())
    queue = tb(*api, "queue").stdout
    assert "starts in" in queue and ("~12m" in queue) and "2 (ids 0,1)" in queue
    status = tb(*api, "status", waiting).stdout
    assert "queue position 1, starts in about 12m" in status
    shown = tb(*api, "status", running).stdout
    assert "gpus 2 (ids 0,1) on box1" in shown and "running for " in shown
    listed = tb(*api, "list").stdout
    assert "2 (ids 0,1)" in listed


def test_login_then_the_cli_finds_its_server_from_anywhere(served, tmp_path, monkeypatch):
    url, _ = served
    token = _user("ann")
    refused = tb("login", url, "--token", "tbx_wrong", code=cc.EXIT_AUTH)
    assert "HTTP 401" in one_line_error(refused)
    assert "logged in to" in tb("login", url + "/", "--token", token).stdout
    stored = json.loads((tmp_path / "xdg-config" / "trainbox" / "config.json").read_text())
    assert stored == {"url": url, "tokens": {url: token}}
    assert (tmp_path / "xdg-config" / "trainbox" / "config.json").stat().st_mode & 0o077 == 0
    monkeypatch.chdir(tmp_path)
    me = tb("whoami").stdout
    assert f"server {url} (from" in me and "config.json (trainbox login)" in me and "ann" in me
    # The environment comes before the stored login: its URL gets no stored token of another server.
    other = tb("whoami", code=cc.EXIT_AUTH, env={"TRAINBOX_URL": url.replace("127.0.0.1", "localhost")})
    assert "no token was sent" in one_line_error(other)
    assert "forgot" in tb("logout").stdout
    assert "(from the default)" in runner.invoke(app, ["whoami"]).stdout

    # Logging in to the local stack's URL takes its admin token from its data dir: nothing to paste.
    from core.db import session_scope
    from core.users import ensure_local_token

    with session_scope() as session:
        ensure_local_token(session, get_settings())
    (tmp_path / "stack.json").write_text(json.dumps({"url": url, "pid": os.getpid()}))
    monkeypatch.setenv("TRAINBOX_DATA_DIR", str(tmp_path))
    assert "as admin (token the local stack's" in tb("login", url, input="").stdout
