"""The launcher: one process per rank, their output into train.log, fate shared, end always reported.

Like `deepspeed`/`torchrun` for one box, plus what a supervised service needs: ranks die with the
launcher (PR_SET_PDEATHSIG), a failing rank stops the others, SIGTERM reaches every rank so they
checkpoint together, and the `end` event names the rank that failed first and why.

Rendezvous works as torchrun's agent store: the launcher serves the TCPStore on a port the OS
assigns and holds it for the run; every rank, rank 0 included, connects to it as a client
(TORCHELASTIC_USE_AGENT_STORE). No rank binds a rendezvous port, so no other program can take one
between a check and a bind (EADDRINUSE), and two jobs never pick the same one.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from trainer.events import (
    ERRORS_DIR,
    EXIT_FAILED,
    EXIT_INVALID,
    EXIT_OK,
    EXIT_PREEMPTED,
    LOG_FILE,
    EventWriter,
    read_events,
    remove_error_reserves,
)
from trainer.paths import SpecError, inspect_dataset, resolve_dataset, resolve_model
from trainer.spec import JobSpec, describe_errors

PR_SET_PDEATHSIG = 1
FAILURE_GRACE_S = 5.0  # after one rank fails, how long the others get before SIGKILL
# How a rank reports that a peer died under it (gloo, NCCL): a symptom, not the cause.
_PEER_GONE = re.compile(
    r"Connection (reset|closed) by peer|Broken pipe|NCCL communicator was aborted|peer.*(died|closed)", re.I
)


def set_pdeathsig(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send `sig` to this process when its parent dies (Linux)."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def visible_gpus() -> int:
    """How many CUDA devices this process may use, without importing torch (NVML, CUDA_VISIBLE_DEVICES)."""
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None and cvd.strip() in ("", "-1"):
        return 0
    try:
        import pynvml

        pynvml.nvmlInit()
        count = int(pynvml.nvmlDeviceGetCount())
        pynvml.nvmlShutdown()
    except Exception:  # no driver, no library: a CPU box
        return 0
    return min(count, len([d for d in cvd.split(",") if d.strip()])) if cvd else count


def _describe_exit(rank: int, code: int) -> str:
    if code < 0:
        return f"rank {rank} was killed by {signal.Signals(-code).name}"
    return f"rank {rank} exited with code {code}"


def _copy_output(proc: subprocess.Popen[bytes], rank: int, log: Any, lock: threading.Lock) -> None:
    assert proc.stdout is not None
    prefix = f"[rank {rank}] ".encode()
    for line in iter(proc.stdout.readline, b""):
        with lock:
            log.write(prefix + line)
            log.flush()


class Launcher:
    def __init__(self, args: Any) -> None:
        self.args = args
        self.run_dir = Path(args.run_dir)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.stop_requested = False  # SIGTERM/SIGINT came from outside: ranks dying of it are stopped, not failed
        self.store: Any = None  # the rendezvous TCPStore, held until the ranks are gone
        self.world = 0  # ranks to start

    def _end(self, status: str, error: dict[str, Any] | None = None) -> None:
        writer = EventWriter(self.run_dir)
        writer.emit("end", status=status, step=None, error=error)
        writer.close()

    def _precheck(self) -> JobSpec:
        """Spec and paths checked before any rank starts: a bad job fails in milliseconds."""
        spec = JobSpec.model_validate_json(Path(self.args.spec).read_text())
        resolve_model(spec.model, Path(self.args.model_root))
        inspect_dataset(resolve_dataset(spec.dataset, Path(self.args.data_root)), spec.dataset, max_records=1000)
        return spec

    def _rendezvous(self, world: int) -> int:
        """Serve the ranks' rendezvous store; returns its port (the OS's pick unless --master-port)."""
        from torch.distributed import TCPStore

        self.store = TCPStore(
            "127.0.0.1", int(self.args.master_port or 0), world_size=world, is_master=True, wait_for_workers=False
        )
        return int(self.store.port)

    def _env(self, world: int, gpus: int, port: int) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            # torch.distributed's env:// rendezvous then connects every rank to the launcher's store.
            TORCHELASTIC_USE_AGENT_STORE="True",
            WORLD_SIZE=str(world),
            LOCAL_WORLD_SIZE=str(world),
            PYTHONUNBUFFERED="1",
        )
        if gpus == 0:
            env["DS_ACCELERATOR"] = "cpu"
            cores = len(os.sched_getaffinity(0))
            env.setdefault("OMP_NUM_THREADS", str(max(1, cores // world)))
        return env

    def _forward(self, signum: int, _frame: Any) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stop_requested = True
        self._forward(signum, frame)

    def _stopped(self, code: int | None) -> bool:
        """An exit that is not a failure: done, checkpointed on a stop, or ended by a stop during start-up."""
        return code in (EXIT_OK, EXIT_PREEMPTED) or (self.stop_requested and code in (-signal.SIGTERM, -signal.SIGINT))

    def run(self) -> int:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.args.die_with_parent:
            set_pdeathsig(signal.SIGKILL)
        try:
            spec = self._precheck()
        except (ValidationError, SpecError, ValueError) as e:
            message = describe_errors(e) if isinstance(e, ValidationError) else str(e)
            self._end("failed", {"type": "invalid", "message": message})
            print(f"invalid: {message}", file=sys.stderr)
            return EXIT_INVALID
        gpus = visible_gpus()
        if gpus and gpus < spec.gpus:
            msg = f"the spec needs {spec.gpus} GPUs but only {gpus} are visible to this launcher"
            self._end("failed", {"type": "launch_error", "message": msg})
            return EXIT_FAILED
        errors = self.run_dir / ERRORS_DIR
        for f in errors.glob("rank-*.json") if errors.is_dir() else []:
            f.unlink()
        offset = (self.run_dir / "events.jsonl").stat().st_size if (self.run_dir / "events.jsonl").exists() else 0

        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        try:
            port = self._rendezvous(spec.gpus)
        except Exception as e:  # noqa: BLE001 - reported as the job's error
            self._end("failed", {"type": "launch_error", "message": f"rendezvous store: {type(e).__name__}: {e}"})
            return EXIT_FAILED
        env = self._env(spec.gpus, gpus, port)
        self.world = spec.gpus
        cmd = [sys.executable, "-m", "trainer", "rank", "--spec", str(self.args.spec), "--run-dir",
               str(self.run_dir), "--model-root", str(self.args.model_root), "--data-root", str(self.args.data_root)]
        if self.args.no_save:
            cmd.append("--no-save")
        lock = threading.Lock()
        copiers = []
        with (self.run_dir / LOG_FILE).open("ab") as log:
            for r in range(spec.gpus):
                if self.stop_requested:  # a stop before every rank started: start no more
                    break
                p = subprocess.Popen(
                    cmd, env=env | {"RANK": str(r), "LOCAL_RANK": str(r)},
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=set_pdeathsig,
                )
                self.procs.append(p)
                t = threading.Thread(target=_copy_output, args=(p, r, log, lock), daemon=True)
                t.start()
                copiers.append(t)
            if self.stop_requested:  # it may have come while a rank was being started, before it was listed
                self._forward(signal.SIGTERM, None)
            first_failure = self._wait()
            for t in copiers:
                t.join(timeout=5)
        return self._finish(first_failure, offset)

    def _wait(self) -> tuple[int, int] | None:
        """Wait for every rank; on the first failure stop the rest (SIGTERM, then SIGKILL)."""
        failures: list[tuple[int, int]] = []  # in the order seen
        killed_by_us: set[int] = set()
        kill_at = None
        while any(p.poll() is None for p in self.procs):
            for r, p in enumerate(self.procs):
                code = p.poll()
                if code is not None and not self._stopped(code) and r not in {f[0] for f in failures}:
                    failures.append((r, code))
            if failures and kill_at is None:
                kill_at = time.monotonic() + FAILURE_GRACE_S
                # Ranks still in start-up die of this SIGTERM: not a cause worth reporting either.
                killed_by_us.update(r for r, p in enumerate(self.procs) if p.poll() is None)
                self._forward(signal.SIGTERM, None)
            if kill_at is not None and time.monotonic() > kill_at:
                for r, p in enumerate(self.procs):
                    if p.poll() is None:
                        killed_by_us.add(r)
                        p.kill()
            time.sleep(0.05)
        for r, p in enumerate(self.procs):
            if not self._stopped(p.returncode) and r not in {f[0] for f in failures}:
                failures.append((r, p.returncode))
        return self._cause(failures, killed_by_us)

    def _cause(self, failures: list[tuple[int, int]], killed_by_us: set[int]) -> tuple[int, int] | None:
        """The failure worth reporting: a rank killed from outside, else one whose error is not merely
        a broken connection to a peer that went first, else the first failure seen."""
        if not failures:
            return None
        for r, code in failures:
            if code < 0 and r not in killed_by_us:
                return r, code
        for r, code in failures:
            error_file = self.run_dir / ERRORS_DIR / f"rank-{r}.json"
            if error_file.exists() and not _PEER_GONE.search(error_file.read_text()):
                return r, code
        return failures[0]

    def _finish(self, first_failure: tuple[int, int] | None, offset: int) -> int:
        from trainer.checkpoint import remove_partial

        # Every rank is gone: a save cut short (a rank out of disk space, or killed mid-save) is garbage,
        # and on a full disk its space is what the end event needs.
        remove_partial(self.run_dir)
        remove_error_reserves(self.run_dir)
        ended = any(e.get("type") == "end" for e in read_events(self.run_dir, offset))
        if first_failure is None:
            # Exit 75 (checkpointed), or stopped during start-up (nothing to save yet), or never started.
            preempted = len(self.procs) < self.world or any(p.returncode != EXIT_OK for p in self.procs)
            if not ended:
                self._end("preempted" if preempted else "succeeded")
            return EXIT_PREEMPTED if preempted else EXIT_OK
        rank, code = first_failure
        error_file = self.run_dir / ERRORS_DIR / f"rank-{rank}.json"
        if error_file.exists():
            import json

            err = json.loads(error_file.read_text())
            error = {"type": err["type"], "message": f"rank {rank}: {err['message']}", "exit_code": code}
        else:
            error = {"type": "train_error", "message": _describe_exit(rank, code), "exit_code": code}
        if not ended:
            self._end("failed", error)
        return EXIT_INVALID if error["type"] == "invalid" else EXIT_FAILED
