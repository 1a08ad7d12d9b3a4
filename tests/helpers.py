"""Small helpers shared by the tests."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from redis import Redis

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.05, what: str = "") -> T:
    """Poll until predicate() is truthy and return its value; fail the test after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


def healthy(url: str) -> bool:
    """Whether the API at url answers GET /healthz with 200 (for `wait_for`)."""
    try:
        return httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def redis_or_skip(url: str, **options: Any) -> Redis:
    """A client of the Redis at url once it answers a ping; the test is skipped where none does."""
    r = Redis.from_url(url, **options)
    try:
        r.ping()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"Redis not reachable at {url}: {e}")
    return r


@contextmanager
def serve(app: Any) -> Iterator[str]:
    """Serve `app` with uvicorn in a thread on a free port (a real socket); yields its base URL."""
    import socket
    import threading

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, timeout=10, what="uvicorn start")
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        app.state.engine.dispose()


@contextmanager
def lock_holder(lock: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A live DeepSpeed builder: a process that created `lock` (O_EXCL) and holds it until the block ends."""
    code = "import os, sys, time; os.open(sys.argv[1], os.O_CREAT | os.O_EXCL); print(1, flush=True); time.sleep(600)"
    holder = subprocess.Popen([sys.executable, "-c", code, str(lock)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline()
        yield holder
    finally:
        holder.kill()
        holder.wait()


@contextmanager
def small_filesystem(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (e.g. "20m") mounted at path, unmounted after; skips the test where mounting
    is not allowed (not root, no tmpfs). A full disk, for real, without filling the machine's."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)  # busy: detach it now, freed when idle


def resize_filesystem(path: Path, size: str) -> None:
    """Grow or shrink a tmpfs small_filesystem mounted (its contents stay)."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True, capture_output=True)
