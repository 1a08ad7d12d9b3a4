"""The op cache this stack owns (TORCH_EXTENSIONS_DIR): built before any job runs, stale locks removed.

torch.utils.cpp_extension guards each op's build directory with a lock file that its builder holds
open from creation to removal. A builder SIGKILLed in between (a job cancelled during start-up)
leaves the file, and every later rank waits on it forever. A lock no live process holds open is
stale: the worker removes it at start and before each launch, with a log line.

`python -m worker.ops` builds the cache for this box (scripts/setup.sh runs it).
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from trainer.launch import set_pdeathsig
from trainer.ops import OPS

log = logging.getLogger(__name__)

LOCK_NAME = "lock"  # torch's FileBaton in each op's build directory: <cache>/<op>/lock


class OpsError(RuntimeError):
    """The ops could not be built; the message says why (compiler output, or the lock in the way)."""


def build_locks(root: Path) -> list[Path]:
    """The build lock files present in the cache."""
    return sorted(root.glob(f"*/{LOCK_NAME}")) if root.is_dir() else []


def lock_holders(lock: Path) -> list[int]:
    """PIDs that hold the lock file open (Linux /proc; processes this user cannot inspect are not seen)."""
    target = os.path.realpath(lock)
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            for fd in os.scandir(f"/proc/{entry.name}/fd"):
                try:
                    if os.readlink(fd.path) == target:
                        pids.append(int(entry.name))
                        break
                except OSError:
                    continue
        except OSError:  # gone, or not ours
            continue
    return pids


def _is_stale(lock: Path, settle_s: float) -> bool:
    """No process holds it, and none did a moment later (a builder closes its lock just before removing it)."""
    try:
        inode = lock.stat().st_ino
        if lock_holders(lock):
            return False
        time.sleep(settle_s)
        return lock.stat().st_ino == inode and not lock_holders(lock)
    except FileNotFoundError:
        return False


def remove_stale_locks(root: Path, settle_s: float = 0.5) -> list[Path]:
    """Remove the build locks of builders that are gone; returns what was removed (each one logged)."""
    removed = []
    for lock in build_locks(root):
        if not _is_stale(lock, settle_s):
            continue
        try:
            lock.unlink()
        except FileNotFoundError:
            continue
        removed.append(lock)
        log.warning("removed a stale DeepSpeed build lock %s: no process holds it (its builder was killed)", lock)
    return removed


def describe_locks(root: Path) -> str:
    """The build locks in the cache and who holds them, for an error message; '' when there are none."""
    parts = []
    for lock in build_locks(root):
        holders = lock_holders(lock)
        parts.append(f"{lock} (held by pid {', '.join(map(str, holders))})" if holders else f"{lock} (no holder)")
    return "; ".join(parts)


def prepare_ops(*, accelerator: str, root: Path, timeout_s: float, env: dict[str, str]) -> float:
    """Remove stale locks, then build what `accelerator` ranks compile (`python -m trainer.ops`) into
    `root`; returns the seconds it took. Raises OpsError when the build fails or does not finish."""
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_locks(root)
    names = OPS[accelerator]
    if not names:
        log.info("DeepSpeed ops: %s ranks compile none; cache %s", accelerator, root)
        return 0.0
    log.info(
        "DeepSpeed ops: building %s for %s ranks in %s (compiled once: a minute or two; then seconds)",
        ", ".join(names),
        accelerator,
        root,
    )
    from worker.supervisor import kill_session  # (the supervisor imports this module)

    t0 = time.monotonic()
    env = env | {"TORCH_EXTENSIONS_DIR": str(root)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer.ops", "--accelerator", accelerator],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        # Fate sharing: a worker killed mid-build takes its builder along (its lock is then stale,
        # and the next start removes it).
        preexec_fn=functools.partial(set_pdeathsig, signal.SIGKILL, os.getpid()),
        text=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        # The whole session: ninja starts the compilers in process groups of their own.
        kill_session(proc.pid)
        proc.communicate()
        locks = describe_locks(root)
        raise OpsError(
            f"building the DeepSpeed ops did not finish within {timeout_s:.0f}s"
            + (f"; build locks: {locks}" if locks else "")
        ) from None
    finally:
        if proc.poll() is None:
            kill_session(proc.pid)
            proc.wait()
    seconds = time.monotonic() - t0
    if proc.returncode != 0:
        tail = "\n".join(output.strip().splitlines()[-20:])
        raise OpsError(f"building the DeepSpeed ops failed (exit {proc.returncode}):\n{tail}")
    for line in output.strip().splitlines():
        log.info("DeepSpeed ops: %s", line)
    log.info("DeepSpeed ops ready in %.1fs", seconds)
    return seconds


def prepare_box_ops(accelerator: str) -> float:
    """prepare_ops for this box from the settings; also points this process's own loads at the cache."""
    from core.settings import get_settings
    from worker.supervisor import child_env

    settings = get_settings()
    root = settings.extensions_dir
    os.environ["TORCH_EXTENSIONS_DIR"] = str(root)
    return prepare_ops(
        accelerator=accelerator, root=root, timeout_s=settings.start_timeout_s, env=child_env(accelerator, [])
    )


def main() -> int:
    """`python -m worker.ops`: build this box's op cache (what the worker does at start)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from worker.box import box_accelerator, box_devices

    try:
        prepare_box_ops(box_accelerator(box_devices()))
    except OpsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
