"""`trainbox up` and `trainbox demo` as a new user runs them: fresh directory, nothing configured,
real processes (embedded Redis, uvicorn, Celery worker, the trainer on CPU ranks)."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
from pathlib import Path

import psutil
import pytest

from client.sdk import Client
from client.stack import free_port
from tests.client.conftest import trainbox_argv
from tests.helpers import healthy, wait_for

pytestmark = pytest.mark.slow


def _run(argv: list[str], env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(trainbox_argv() + argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_up_then_demo_and_the_job_commands(tmp_path: Path, user_env: dict[str, str]) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    up = subprocess.Popen(
        trainbox_argv() + ["up", "--port", str(port)],
        env=user_env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(lambda: healthy(url) or up.poll() is not None, timeout=120, what="trainbox up ready")
        assert up.poll() is None, up.stdout.read() if up.stdout else ""
        children = psutil.Process(up.pid).children(recursive=True)
        names = " ".join(" ".join(c.cmdline()) for c in children)
        assert "redis-server" in names and "uvicorn" in names and "-m worker" in names
        assert (tmp_path / ".trainbox" / "trainbox.db").exists(), "SQLite under the default data dir"

        demo = _run(["demo", "--steps", "20"], user_env, tmp_path)
        assert demo.returncode == 0, demo.stdout + demo.stderr
        assert "using the running stack" in demo.stdout
        assert "succeeded" in demo.stdout and "loss" in demo.stdout

        # Found from any directory, with no setting: the note `up` left for its user.
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        me = _run(["whoami"], user_env, elsewhere)
        assert me.returncode == 0 and f"server {url} (from the running trainbox up" in me.stdout, me.stdout + me.stderr
        assert "admin (admin)" in me.stdout
        cli_env = {**user_env, "TRAINBOX_URL": url}
        listed = _run(["list", "--json"], cli_env, tmp_path)
        job = json.loads(listed.stdout)["data"][0]
        assert job["state"] == "succeeded" and job["name"] == "demo-tiny"
        status = _run(["status", job["id"]], cli_env, tmp_path)
        assert status.returncode == 0 and "succeeded" in status.stdout
        logs = _run(["logs", job["id"], "--tail", "3"], cli_env, tmp_path)
        assert logs.returncode == 0 and len(logs.stdout.strip().splitlines()) == 3
        gpus = _run(["gpus"], cli_env, tmp_path)
        assert "cpu-slot" in gpus.stdout and "0 of 2 in use" in gpus.stdout

        spec = tmp_path / "job.yaml"
        spec.write_text(
            "name: cli-yaml\nmodel: preset:tiny\ndataset: {path: demo/corpus.jsonl}\ngpus: 1\nseq_len: 32\n"
            "max_steps: 5\ndeepspeed: {train_batch_size: 4}\n"
        )
        submitted = _run(["submit", str(spec), "--follow"], cli_env, tmp_path)
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        assert "submitted" in submitted.stdout and "succeeded" in submitted.stdout

        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"name": "bad", "model": "preset:tiny", "dataset": {"path": "nope.jsonl"}}))
        refused = _run(["submit", str(bad)], cli_env, tmp_path)
        assert refused.returncode == 8 and "nope.jsonl" in refused.stderr  # 422: exit code 8
        assert "trainbox datasets upload nope.jsonl" in refused.stderr

        # A job still training when Ctrl-C comes checkpoints and goes back to the queue.
        spec.write_text(spec.read_text().replace("max_steps: 5", "max_steps: 100000\ncheckpoint_every: 5"))
        long_job = _run(["submit", str(spec)], cli_env, tmp_path)
        long_id = long_job.stdout.split()[1]
        api = Client(url, (tmp_path / ".trainbox" / "token").read_text().strip())
        wait_for(lambda: (api.get(long_id)["progress"]["step"] or 0) >= 3, timeout=120)
    finally:
        up.send_signal(signal.SIGINT)  # Ctrl-C
        out, _ = up.communicate(timeout=120)
    assert up.returncode == 0, out
    assert "all stopped" in out
    assert "dashboard at " + url + "/" in out
    assert not (Path(user_env["XDG_STATE_HOME"]) / "trainbox" / "stack.json").exists()  # the note goes with it
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert not healthy(url)
    with sqlite3.connect(tmp_path / ".trainbox" / "trainbox.db") as db:
        state, attempt = db.execute("SELECT state, attempt FROM jobs WHERE id = ?", (long_id,)).fetchone()
    assert (state, attempt) == ("queued", 2)
    assert (tmp_path / ".trainbox" / "runs" / long_id / "checkpoints").is_dir()


def test_demo_alone_starts_and_stops_its_own_stack(tmp_path: Path, user_env: dict[str, str]) -> None:
    port = free_port()
    demo = _run(["demo", "--steps", "10", "--port", str(port)], user_env, tmp_path)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "starting the stack" in demo.stdout and "succeeded" in demo.stdout and "all stopped" in demo.stdout
    assert not healthy(f"http://127.0.0.1:{port}")
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    assert leftovers == []
