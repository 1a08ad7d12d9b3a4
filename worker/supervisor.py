"""Run one attempt of a job: spawn the trainer in its own session with only its devices, race its
exit against cancel, deadline and shutdown, stop it cleanly, and say how it ended.

Nothing here touches the database or Redis: the caller passes a `tick` that relays events, renews
the lease and reports a stop reason, so the process handling can be tested on its own.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import psutil

from trainer.events import (
    EVENTS_FILE,
    EXIT_INVALID,
    EXIT_OK,
    EXIT_PREEMPTED,
    LAUNCHER_LOG,
    LOG_FILE,
    SPEC_FILE,
    TRAINER_ERROR_TYPES,
    ErrorType,
    trainer_argv,
)
from trainer.launch import set_pdeathsig
from worker.ops import describe_locks, remove_stale_locks
from worker.relay import FileTail

LOG_TAIL_LINES = 40


class Stop(StrEnum):
    """Why the supervisor stops a run that has not ended by itself."""

    CANCEL = "cancel"  # a user asked; ends `cancelled`
    TIMEOUT = "timeout"  # max_runtime_s passed; checkpoint, then `failed`/timeout
    NO_START = "no_start"  # no rank started within start_timeout_s; `failed`/launch_error
    SHUTDOWN = "shutdown"  # the worker is going away; checkpoint, then back to the queue
    LOST = "lost"  # this attempt no longer owns the job; stop and write nothing


@dataclass(frozen=True)
class Launch:
    """Everything needed to start one attempt of a job."""

    job_id: str
    attempt: int
    spec: dict[str, Any]
    run_dir: Path
    devices: list[int]
    accelerator: str  # "cuda" or "cpu"
    model_root: Path
    data_root: Path
    max_runtime_s: float | None = None
    cancel_grace_s: float = 30.0
    start_timeout_s: float | None = None  # no `start` event by then: stop it, `failed`/launch_error
    extensions_dir: Path | None = None  # DeepSpeed's op cache (TORCH_EXTENSIONS_DIR), built by the worker
    cpu_threads: int | None = None  # CPU boxes: threads per rank (OMP_NUM_THREADS), a slot's share of cores
    token_cache_bytes: int | None = None  # the shared tokenized-data cache's bound (None: the trainer's default)
    command: list[str] | None = None  # replaces the trainer command (tests, benchmarks)


@dataclass
class Outcome:
    """How an attempt ended: `succeeded`, `failed`, `cancelled`, `preempted` or `lost`."""

    kind: str
    exit_code: int | None = None
    error: dict[str, Any] | None = None
    end_event: dict[str, Any] | None = None
    stop: Stop | None = None
    survivors_killed: int = 0


def trainer_command(launch: Launch) -> list[str]:
    """The trainer's command line (docs/TRAINER.md, Launch)."""
    if launch.command:
        return list(launch.command)
    return trainer_argv(
        launch.run_dir,
        model_root=launch.model_root,
        data_root=launch.data_root,
        token_cache_bytes=launch.token_cache_bytes,
    )


def trainer_env(launch: Launch, base: dict[str, str] | None = None) -> dict[str, str]:
    """The child's environment: only the assigned devices visible, no trainbox settings or secrets."""
    return child_env(
        launch.accelerator,
        launch.devices,
        cpu_threads=launch.cpu_threads,
        extensions_dir=launch.extensions_dir,
        base=base,
    )


def child_env(
    accelerator: str,
    devices: list[int],
    *,
    cpu_threads: int | None = None,
    extensions_dir: Path | None = None,
    base: dict[str, str] | None = None,
) -> dict[str, str]:
    """The environment of a trainer process (a job's ranks, or the worker's op build) on `accelerator`."""
    base = dict(os.environ) if base is None else base
    env = {k: v for k, v in base.items() if not k.startswith("TRAINBOX_")}
    env["PYTHONUNBUFFERED"] = "1"
    # `python -m trainer` must import the same trainer as this worker, installed or run from a checkout.
    spec = importlib.util.find_spec("trainer")
    if spec is not None and spec.origin:
        root = str(Path(spec.origin).parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    # DeepSpeed's ops build with the ninja installed beside this interpreter, not whichever ninja is first
    # on PATH: a stack started without activating its venv built with the system's (or found none), and
    # two ninjas see each other's build commands as changed and rebuild the shared op cache.
    # Only for a virtual environment: a system interpreter's bin (/usr/bin) must not go ahead of the rest.
    if sys.prefix != sys.base_prefix and sys.executable:
        env["PATH"] = os.pathsep.join(p for p in (str(Path(sys.executable).parent), env.get("PATH", "")) if p)
    if extensions_dir is not None:
        env["TORCH_EXTENSIONS_DIR"] = str(extensions_dir)
    if accelerator == "cuda":
        # Device numbers are NVML's (the box registered them so); CUDA's default order may differ.
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        if devices:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in devices)
        env.pop("DS_ACCELERATOR", None)
    else:
        # Hide any GPU so a CPU slot never touches one, and make DeepSpeed pick its CPU accelerator.
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["DS_ACCELERATOR"] = "cpu"
        if cpu_threads:
            env["OMP_NUM_THREADS"] = str(cpu_threads)
    return env


def session_members(sid: int) -> list[psutil.Process]:
    """Live processes of a process session (the trainer and every rank it started)."""
    out = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except (ProcessLookupError, psutil.Error, PermissionError):
            continue
    return out


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def kill_session(sid: int, timeout: float = 10.0) -> int:
    """SIGKILL every process left in the session and wait until none is alive; return how many there were."""
    members = session_members(sid)
    for proc in members:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    _signal_group(sid, signal.SIGKILL)
    _, alive = psutil.wait_procs(members, timeout=timeout)
    if alive or session_members(sid):
        raise RuntimeError(f"processes of session {sid} survived SIGKILL: {[p.pid for p in alive]}")
    return len(members)


def read_tail(path: Path, lines: int = LOG_TAIL_LINES, max_bytes: int = 64 * 1024) -> list[str]:
    """The last lines of a text file, read from its end (logs can be large)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except FileNotFoundError:
        return []
    return data.decode("utf-8", "replace").splitlines()[-lines:]


def last_end_event(events_path: Path, offset: int = 0) -> dict[str, Any] | None:
    """The last `end` event written after `offset` (this attempt's part of events.jsonl)."""
    end = None
    try:
        with events_path.open("rb") as f:
            f.seek(offset)
            for raw in f:
                with contextlib.suppress(ValueError):
                    event = json.loads(raw)
                    if isinstance(event, dict) and event.get("type") == "end":
                        end = event
    except FileNotFoundError:
        return None
    return end


def log_tail(run_dir: Path, lines: int = LOG_TAIL_LINES) -> str:
    """What a failed job shows: the end of train.log, or of the launcher's own output if that is all."""
    tail = read_tail(run_dir / LOG_FILE, lines)
    launcher = read_tail(run_dir / LAUNCHER_LOG, lines)
    if launcher and len(tail) < lines:
        tail = launcher[-(lines - len(tail)) :] + tail
    return "\n".join(tail)


class StartWatch:
    """Reads events.jsonl from an offset until a `start` event shows: the ranks are through start-up."""

    def __init__(self, path: Path, offset: int) -> None:
        self.tail, self.started = FileTail(path, offset), False

    def poll(self) -> bool:
        for line in [] if self.started else self.tail.read_lines():
            with contextlib.suppress(ValueError, AttributeError):
                self.started = self.started or json.loads(line).get("type") == "start"
        return self.started


def no_start_message(timeout_s: float, run_dir: Path, extensions_dir: Path | None) -> str:
    """Why a job that never started failed: the wait, the build locks in the way, the last log lines."""
    message = f"no rank started within {timeout_s:.0f} s"
    locks = describe_locks(extensions_dir) if extensions_dir is not None else ""
    if locks:
        message += f"; DeepSpeed build locks: {locks}"
    tail = log_tail(run_dir, lines=5)
    return message + (f"; last log lines: {tail}" if tail.strip() else "; the log is empty")


def classify(
    exit_code: int | None,
    end: dict[str, Any] | None,
    stop: Stop | None,
    run_dir: Path,
    *,
    no_start: str = "no rank started in time",
) -> Outcome:
    """Map the trainer's exit code, its `end` event and the supervisor's stop reason to an outcome
    (`no_start`: the message of a job stopped because it never started)."""

    def failed(kind: ErrorType, message: str) -> Outcome:
        # The failing rank's exit code when the trainer names one (a killed rank: -9), else the trainer's.
        code = ((end or {}).get("error") or {}).get("exit_code", exit_code)
        error = {"type": kind, "message": message, "log_tail": log_tail(run_dir), "exit_code": code}
        return Outcome("failed", exit_code, error, end, stop)

    if stop is Stop.LOST:
        return Outcome("lost", exit_code, None, end, stop)
    if exit_code == EXIT_OK:
        # Finished before a stop could take effect (a stopped trainer exits 75): the work is done.
        return Outcome("succeeded", exit_code, None, end, stop)
    if stop is Stop.CANCEL:
        return Outcome("cancelled", exit_code, None, end, stop)
    if stop is Stop.NO_START:
        return failed(ErrorType.LAUNCH_ERROR, no_start)
    if stop is Stop.TIMEOUT:
        step = (end or {}).get("step")
        where = f" at step {step}" if step is not None else ""
        return failed(ErrorType.TIMEOUT, f"max_runtime_s passed; stopped{where} after a checkpoint")
    if exit_code == EXIT_PREEMPTED or stop is Stop.SHUTDOWN:
        return Outcome("preempted", exit_code, None, end, stop)
    end_error = (end or {}).get("error") or {}
    if exit_code == EXIT_INVALID:
        return failed(ErrorType.INVALID, end_error.get("message") or "the trainer refused the spec, paths or data")
    given = end_error.get("type")
    kind = ErrorType(given) if given in TRAINER_ERROR_TYPES - {ErrorType.INVALID} else None
    if exit_code is not None and exit_code < 0:
        message = f"the trainer was killed by signal {signal.Signals(-exit_code).name}"
    else:
        message = end_error.get("message") or f"the trainer exited with code {exit_code}"
    return failed(kind or ErrorType.TRAIN_ERROR, message)


def supervise(
    launch: Launch,
    tick: Callable[[], Stop | None] = lambda: None,
    *,
    poll_s: float = 0.05,
    now: Callable[[], float] = time.monotonic,
) -> Outcome:
    """Run the trainer to its end (or stop it), make sure nothing of it survives, return the outcome."""
    run_dir = launch.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / SPEC_FILE).write_text(json.dumps(launch.spec, indent=2))
    events_path = run_dir / EVENTS_FILE
    events_offset = events_path.stat().st_size if events_path.exists() else 0
    if launch.extensions_dir is not None:
        remove_stale_locks(launch.extensions_dir)  # a job killed while it held one (each removal is logged)
    try:
        with (run_dir / LAUNCHER_LOG).open("ab") as out:
            proc = subprocess.Popen(
                trainer_command(launch),
                cwd=run_dir,
                env=trainer_env(launch),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # Fate sharing: if the supervising worker dies, the launcher (and through it the ranks) dies too.
                preexec_fn=functools.partial(set_pdeathsig, signal.SIGKILL),
            )
    except OSError as exc:
        error = {"type": ErrorType.LAUNCH_ERROR, "message": f"could not start the trainer: {exc}", "log_tail": ""}
        return Outcome("failed", None, error)

    started_at = now()
    deadline = started_at + launch.max_runtime_s if launch.max_runtime_s else None
    start_watch = StartWatch(events_path, events_offset)
    no_start = ""
    stop: Stop | None = None
    term_sent_at: float | None = None
    try:
        while proc.poll() is None:
            reason = tick()
            if reason is None and deadline is not None and now() >= deadline:
                reason = Stop.TIMEOUT
            if (
                reason is None
                and launch.start_timeout_s is not None
                and stop is None
                and now() - started_at >= launch.start_timeout_s
                and not start_watch.poll()
            ):
                # Ranks that hang before training (a build lock, a rendezvous) would sit `running` forever.
                reason = Stop.NO_START
                no_start = no_start_message(launch.start_timeout_s, run_dir, launch.extensions_dir)
            if reason is not None and stop is None:
                # SIGTERM: every rank finishes its step, checkpoints and exits 75.
                stop, term_sent_at = reason, now()
                _signal_group(proc.pid, signal.SIGTERM)
            if term_sent_at is not None and now() - term_sent_at >= launch.cancel_grace_s:
                _signal_group(proc.pid, signal.SIGKILL)
                term_sent_at = float("inf")
            time.sleep(poll_s)
    finally:
        # Whatever happened (including an exception in tick), no process of the job may outlive it.
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
        survivors = kill_session(proc.pid)
    tick()  # relay what the trainer wrote last
    outcome = classify(proc.returncode, last_end_event(events_path, events_offset), stop, run_dir, no_start=no_start)
    outcome.survivors_killed = survivors
    return outcome
