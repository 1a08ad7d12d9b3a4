"""The embedded stack behind `trainbox up`: SQLite under a data dir, migrations, a Redis server when
none is configured, the API (uvicorn) and a worker, each a child process; stopping stops them all.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

_PR_SET_PDEATHSIG = 1
# Migrations, then the local admin and its token file (in a child: `up` itself imports no server code).
BOOTSTRAP = """
from core.db import upgrade
upgrade()
try:
    from core.users import bootstrap_local_admin
except ImportError:  # a server without users and tokens
    bootstrap_local_admin = None
if bootstrap_local_admin is not None:
    bootstrap_local_admin()
"""


class StackError(RuntimeError):
    """The stack could not start (a missing program, a child that died, a health check that failed)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_server_binary() -> str:
    """The system's redis-server, or one shipped by a pip package (`redis_server`) when installed."""
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None
    )
    if found:
        return found
    with contextlib.suppress(ImportError, AttributeError):
        import redis_server  # type: ignore[import-not-found]

        return str(redis_server.REDIS_SERVER_PATH)
    raise StackError(
        "no redis-server found: install one (e.g. `apt-get install redis-server`) "
        "or point TRAINBOX_REDIS_URL at a running Redis"
    )


def _die_with_parent() -> None:
    # A child of `trainbox up` must not outlive it, even if it is killed with SIGKILL.
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    stop_timeout_s: float


@dataclass
class Stack:
    """The children of one `trainbox up`, started in order and stopped in reverse."""

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8000
    redis_url: str | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    children: list[Child] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.extra_env)
        env["TRAINBOX_DATA_DIR"] = str(self.data_dir)
        env["TRAINBOX_API_HOST"], env["TRAINBOX_API_PORT"] = self.host, str(self.port)
        if self.redis_url:
            env["TRAINBOX_REDIS_URL"] = self.redis_url
        # Children import the packages this process runs from, installed or from a checkout.
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _spawn(self, name: str, argv: list[str], stop_timeout_s: float = 15.0) -> Child:
        logs = self.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{name}.log"
        with log_path.open("ab") as out:
            proc = subprocess.Popen(
                argv,
                env=self.env(),
                cwd=self.data_dir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches `up` only; it stops the children in order
                preexec_fn=_die_with_parent,
            )
        child = Child(name, proc, log_path, stop_timeout_s)
        self.children.append(child)
        return child

    def start(self, *, ready_timeout_s: float = 120.0, on_step=print) -> None:  # type: ignore[no-untyped-def]
        """Data dir, migrations, Redis (when none is configured), API, worker; then wait for /healthz."""
        self.data_dir = self.data_dir.expanduser().resolve()
        for sub in ("runs", "data", "models", "logs"):
            (self.data_dir / sub).mkdir(parents=True, exist_ok=True)
        self.redis_url = self.redis_url or os.environ.get("TRAINBOX_REDIS_URL") or None
        if not self.redis_url:
            redis_port = free_port()
            (self.data_dir / "redis").mkdir(exist_ok=True)
            self._spawn("redis", [
                redis_server_binary(), "--bind", "127.0.0.1", "--port", str(redis_port),
                "--save", "", "--appendonly", "no", "--dir", str(self.data_dir / "redis"),
            ], stop_timeout_s=5.0)  # fmt: skip
            self.redis_url = f"redis://127.0.0.1:{redis_port}/0"
            self._wait_redis(self.redis_url, timeout_s=20.0)
            on_step(f"redis      {self.redis_url} (embedded)")
        on_step("database   migrating; local admin token")
        self._run_migrations()
        self._spawn("api", [sys.executable, "-m", "uvicorn", "api.app:app", "--host", self.host,
                            "--port", str(self.port), "--log-level", "warning"])  # fmt: skip
        # The worker's jobs checkpoint on SIGTERM before it exits: give it the cancel grace and more.
        grace = float(self.env().get("TRAINBOX_CANCEL_GRACE_S", "30"))
        self._spawn("worker", [sys.executable, "-m", "worker"], stop_timeout_s=grace + 30.0)
        self._wait_healthy(ready_timeout_s)
        on_step(f"api        {self.url} (docs at {self.url}/docs)")
        on_step(f"logs       {self.data_dir / 'logs'}")
        if self.token_file.is_file():
            on_step(f"token      {self.token_file} (the CLI reads it; send it as `Authorization: Bearer`)")

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
                    raise StackError(f"redis did not answer at {url} within {timeout_s:.0f}s")
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

    def check_children(self) -> None:
        """Raise StackError if a child has exited (with the end of its log)."""
        for child in self.children:
            code = child.proc.poll()
            if code is not None:
                tail = child.log_path.read_text(errors="replace")[-3000:] if child.log_path.exists() else ""
                raise StackError(f"{child.name} exited with code {code}; its log ends:\n{tail}")

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

    def wait(self) -> None:
        """Block until a child dies (raises StackError) or a signal interrupts."""
        while True:
            self.check_children()
            time.sleep(0.5)
