"""The CLI in a real terminal (pexpect): the live follow view, through a restart of the API server
(a real uvicorn process, killed and started again), and the message when no server answers."""

from __future__ import annotations

import io
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pexpect
import pytest
from redis import Redis

from client.stack import free_port
from core import events, keys
from core.db import get_engine, session_scope, upgrade
from core.models import Job, utcnow
from core.settings import Settings
from tests.client.conftest import REPO, trainbox_argv
from tests.helpers import healthy, redis_or_skip, wait_for

REDIS_URL = "redis://127.0.0.1:6379/6"


@pytest.fixture
def api_server(tmp_path: Path, user_env: dict[str, str]) -> Iterator[tuple[str, Settings, Callable[[], None]]]:
    """The real app under uvicorn in its own process, on SQLite and Redis DB 6; the third value stops it
    and starts it again on the same port."""
    redis_or_skip(REDIS_URL)
    data_dir = tmp_path / "server"
    settings = Settings(data_dir=data_dir, redis_url=REDIS_URL)
    upgrade(settings.database_url)
    env = {
        **user_env,
        "TRAINBOX_DATA_DIR": str(data_dir),
        "TRAINBOX_REDIS_URL": REDIS_URL,
        "TRAINBOX_SSE_BLOCK_MS": "100",
    }
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "uvicorn", "api.app:app", "--host", "127.0.0.1", "--port", str(port)]
    log = (tmp_path / "api.log").open("ab")
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> None:
        procs.append(subprocess.Popen(argv + ["--log-level", "warning"], env=env, cwd=REPO, stdout=log, stderr=log))
        wait_for(lambda: healthy(url) or procs[-1].poll() is not None, timeout=60, what="the API up")
        assert procs[-1].poll() is None, (tmp_path / "api.log").read_text()[-3000:]

    def restart() -> None:
        # SIGTERM, as systemd or `trainbox up` stops it: the server ends its event streams cleanly and
        # then refuses connections, the case that used to end `follow` with a traceback.
        procs[-1].send_signal(signal.SIGTERM)
        procs[-1].wait(20)
        start()

    start()
    try:
        yield url, settings, restart
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
        log.close()
        get_engine(settings.database_url).dispose()


def plain(terminal_text: str) -> str:
    """What the terminal showed, without its colour and cursor codes."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", terminal_text)


def _spawn(args: list[str], env: dict[str, str], cwd: Path) -> tuple[pexpect.spawn, io.StringIO]:
    argv = trainbox_argv() + args
    child = pexpect.spawn(argv[0], argv[1:], env=env, cwd=str(cwd), dimensions=(30, 150), encoding="utf-8", timeout=30)
    seen = io.StringIO()
    child.logfile_read = seen
    return child, seen


def test_follow_shows_steps_and_eval_loss_and_reconnects_through_a_restart(api_server, tmp_path, user_env):
    url, settings, restart = api_server
    from core.users import create_token, create_user

    engine = get_engine(settings.database_url)
    with session_scope(engine) as s:
        create_user(s, name="ann")
        token = create_token(s, user_name="ann")[1]
        job = Job(name="tiny-eval", owner="ann", state="running", spec={"name": "tiny-eval"}, gpus=2, priority=0)
        job.gpu_ids, job.box, job.started_at, job.total_steps = [0, 1], "box1", utcnow(), 4
        s.add(job)
        s.commit()
        job_id = job.id
    r = Redis.from_url(REDIS_URL)
    r.delete(keys.job_events(job_id))

    def publish(event: dict) -> None:
        events.publish(r, job_id, event, maxlen=1000)

    child, seen = _spawn(["--url", url, "--token", token, "follow", job_id], user_env, tmp_path)

    def shows(text: str) -> None:
        try:
            child.expect_exact(text)
        except pexpect.ExceptionPexpect:
            api_log = (tmp_path / "api.log").read_text(errors="replace")[-3000:]
            shown = plain(seen.getvalue())
            raise AssertionError(
                f"{text!r} not shown; the terminal showed:\n{shown}\nthe API's log ends:\n{api_log}"
            ) from None

    try:
        publish({"type": "step", "step": 1, "loss": 3.25, "tokens_per_s": 1200.0})
        shows("3.2500")
        publish({"type": "eval", "step": 1, "eval_loss": 2.31, "perplexity": 10.07})
        shows("step 1: eval loss 2.3100 (ppl 10.07)")

        restart()  # the follower loses its stream, says so, and comes back by itself
        shows("reconnecting")
        publish({"type": "step", "step": 2, "loss": 2.75, "tokens_per_s": 1300.0})
        shows("reconnected")
        shows("2.7500")

        with session_scope(engine) as s:
            done = s.get(Job, job_id)
            done.state, done.finished_at, done.step = "succeeded", utcnow(), 2
            done.latest = {"step": 2, "loss": 2.75, "eval_loss": 2.2, "time": 1.0}
        publish({"type": "state", "state": "succeeded"})
        shows("succeeded")
        child.expect(pexpect.EOF)
        child.close()
        shown = plain(seen.getvalue())
        assert child.exitstatus == 0, shown
        assert "loss 3.2500 -> 2.7500" in shown and "eval loss 2.2000 (ppl 9.03)" in shown
        assert "Traceback" not in shown
    finally:
        r.delete(keys.job_events(job_id))
        r.close()


def test_server_down_and_bad_url_messages_in_a_terminal(tmp_path, user_env):
    port = free_port()
    child, seen = _spawn(["--url", f"http://127.0.0.1:{port}", "follow", "j1"], user_env, tmp_path)
    child.expect(pexpect.EOF)
    child.close()
    shown = plain(seen.getvalue())
    assert child.exitstatus == 3 and "Traceback" not in shown
    assert shown.startswith(f"error: cannot reach http://127.0.0.1:{port} (from --url): connection refused;")
    assert len(shown.strip().splitlines()) == 1

    child, seen = _spawn(["list"], {**user_env, "TRAINBOX_URL": f"127.0.0.1:{port}"}, tmp_path)
    child.expect(pexpect.EOF)
    child.close()
    shown = plain(seen.getvalue())
    assert child.exitstatus == 4 and "Traceback" not in shown
    assert f"(from TRAINBOX_URL) is not an http:// or https:// URL; did you mean http://127.0.0.1:{port}?" in shown
