"""The launcher: torch's elastic agent starts and watches the ranks; this module adds what a
supervised service needs and elastic does not do.

Ranks are started by `torch.distributed.launcher.api.elastic_launch`, as `torchrun --standalone`
does: a c10d rendezvous on localhost:0, whose agent store every rank shares
(TORCHELASTIC_USE_AGENT_STORE) on a port the OS assigns, so no port is picked, raced for or taken by
another program. Elastic sets the rank environment, stops every rank when one fails, forwards
SIGTERM/SIGINT to the ranks and SIGKILLs them after `--stop-grace` seconds.

Kept around it (docs/TRAINER.md, "Launch"):
- the precheck (spec, paths, data) before any rank starts, and the `end` event, always written;
- `_Rank`, elastic's subprocess handler with three changes: the rank stays in the launcher's session
  (elastic starts each rank in a new one, out of reach of the worker's session kill), it dies with
  the launcher (PR_SET_PDEATHSIG), and its output goes through a pipe into train.log, every line
  prefixed "[rank N] " (elastic's tee writes each rank's output to a file and polls it);
- the failure blamed on the rank that caused it, not on a peer that lost its connection to it
  (elastic's root cause is the smallest timestamp, in whole seconds);
- exit 75 when the stop was checkpointed.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from trainer.events import (
    ERRORS_DIR,
    EVENTS_FILE,
    EXIT_FAILED,
    EXIT_INVALID,
    EXIT_OK,
    EXIT_PREEMPTED,
    LOG_FILE,
    ErrorType,
    EventWriter,
    read_events,
    remove_error_reserves,
    trainer_argv,
)
from trainer.hardware import nvml
from trainer.paths import SpecError, inspect_data, resolve_model
from trainer.spec import JobSpec, describe_errors

PR_SET_PDEATHSIG = 1
# SIGTERM -> SIGKILL for ranks that are checkpointing on a stop. Elastic's default (30 s) is shorter
# than a 1.3B-parameter ZeRO checkpoint (about 20 GB) takes on a disk slower than 700 MB/s; under the
# worker, its own cancel_grace_s (shorter) ends a stop that hangs.
STOP_GRACE_S = 600
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)  # the ones elastic handles
# How a rank reports that a peer died under it (gloo, NCCL): a symptom, not the cause.
_PEER_GONE = re.compile(
    r"Connection (reset|closed) by peer|Broken pipe|NCCL communicator was aborted|peer.*(died|closed)", re.I
)
_prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: a forked child must not dlopen


def set_pdeathsig(sig: int = signal.SIGKILL, parent: int | None = None) -> None:
    """Ask the kernel to send `sig` to this process when its parent dies (Linux); a child whose
    `parent` died before it could ask exits at once."""
    with contextlib.suppress(OSError):
        _prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
    if parent is not None and os.getppid() != parent:
        os._exit(1)


def visible_gpus() -> int:
    """How many CUDA devices this process may use, without importing torch (NVML, CUDA_VISIBLE_DEVICES)."""
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None and cvd.strip() in ("", "-1"):
        return 0
    with nvml() as pynvml:
        count = int(pynvml.nvmlDeviceGetCount()) if pynvml else 0  # no NVML: a CPU box
    return min(count, len([d for d in cvd.split(",") if d.strip()])) if cvd else count


def _describe_exit(rank: int, code: int) -> str:
    if code < 0:
        return f"rank {rank} was killed by {signal.Signals(-code).name}"
    return f"rank {rank} exited with code {code}"


def _copy_output(pipe: Any, rank: int, log: Any, lock: threading.Lock) -> None:
    """Whole lines from a rank's pipe into train.log (a pipe, not a file: a full disk never fails a rank's print)."""
    prefix = f"[rank {rank}] ".encode()
    for line in iter(pipe.readline, b""):
        with lock, contextlib.suppress(OSError):  # no room for the log: the rank goes on
            log.write(prefix + line)
            log.flush()
    pipe.close()


def _rank_handler_class() -> type:
    from torch.distributed.elastic.multiprocessing.subprocess_handler import SubprocessHandler

    class _Rank(SubprocessHandler):  # type: ignore[misc]
        """One rank as elastic starts it, but in the launcher's session, dying with it, output piped."""

        launcher: Launcher

        def _popen(self, args: tuple[str, ...], env: dict[str, str]) -> subprocess.Popen[bytes]:
            self.rank = int(env["RANK"])
            self.signalled = False  # a signal from the launcher (elastic), not from outside
            launcher = self.launcher
            self.proc = subprocess.Popen(
                args,
                env=env | launcher.rank_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                process_group=0,  # its own group (elastic signals the group), in the launcher's session
                preexec_fn=lambda: set_pdeathsig(signal.SIGKILL, launcher.pid),
            )
            launcher.ranks.append(self)
            self.copier = threading.Thread(
                target=_copy_output, args=(self.proc.stdout, self.rank, launcher.log, launcher.log_lock), daemon=True
            )
            self.copier.start()
            return self.proc

        def close(self, death_sig: signal.Signals | None = None) -> None:
            if self.proc.poll() is None:
                self.signalled = True
            with contextlib.suppress(ProcessLookupError):  # it exited since elastic looked
                super().close(death_sig)

    return _Rank


def _logs_specs() -> Any:
    """Elastic writes no log or error file: output goes through the ranks' pipes, errors to errors/rank-N.json."""
    from torch.distributed.elastic.multiprocessing.api import LogsDest, LogsSpecs

    class NoFiles(LogsSpecs):  # type: ignore[misc]
        def reify(self, envs: dict[int, dict[str, str]]) -> LogsDest:
            ranks = range(len(envs))
            return LogsDest(
                stdouts=dict.fromkeys(ranks, ""),
                stderrs=dict.fromkeys(ranks, ""),
                error_files=dict.fromkeys(ranks, os.devnull),
            )

        @property
        def root_log_dir(self) -> str:
            return os.devnull

    return NoFiles(log_dir=os.devnull)


class Launcher:
    def __init__(self, args: Any) -> None:
        self.args = args
        self.run_dir = Path(args.run_dir)
        self.pid = os.getpid()
        self.ranks: list[Any] = []  # elastic's handlers of the ranks started, in start order
        self.stop_requested = False  # a stop came from outside: ranks dying of it are stopped, not failed
        self.agent_error: str | None = None  # elastic itself failed (not a rank)
        self.world = 0  # ranks to start
        self.rank_env: dict[str, str] = {}
        self.log: Any = None
        self.log_lock = threading.Lock()

    def _end(self, status: str, error: dict[str, Any] | None = None) -> None:
        writer = EventWriter(self.run_dir)
        writer.emit("end", status=status, step=None, error=error)
        writer.close()

    def _precheck(self) -> JobSpec:
        """Spec and paths checked before any rank starts: a bad job fails in milliseconds."""
        spec = JobSpec.model_validate_json(Path(self.args.spec).read_text())
        resolve_model(spec.model, Path(self.args.model_root))
        inspect_data(spec, Path(self.args.data_root), max_records=1000)
        return spec

    def _env(self, world: int, gpus: int) -> dict[str, str]:
        """Added to what elastic gives each rank (RANK, WORLD_SIZE, MASTER_ADDR/PORT, the agent store)."""
        env = {"PYTHONUNBUFFERED": "1"}
        if gpus == 0:
            env["DS_ACCELERATOR"] = "cpu"
            cores = len(os.sched_getaffinity(0))
            env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", str(max(1, cores // world)))
        return env

    def _note_stop(self, _signum: int, _frame: Any) -> None:
        """Before the launch (importing torch) and after it (writing the end event): remember the stop."""
        self.stop_requested = True

    def _stopped(self, code: int | None) -> bool:
        """An exit that is not a failure: done, checkpointed on a stop, or ended by a stop during start-up."""
        return code in (EXIT_OK, EXIT_PREEMPTED) or (self.stop_requested and code in (-signal.SIGTERM, -signal.SIGINT))

    def run(self) -> int:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            spec = self._precheck()
        except (ValidationError, SpecError, ValueError) as e:
            message = describe_errors(e) if isinstance(e, ValidationError) else str(e)
            self._end("failed", {"type": ErrorType.INVALID, "message": message})
            print(f"invalid: {message}", file=sys.stderr)
            return EXIT_INVALID
        gpus = visible_gpus()
        if gpus and gpus < spec.gpus:
            msg = f"the spec needs {spec.gpus} GPUs but only {gpus} are visible to this launcher"
            self._end("failed", {"type": ErrorType.LAUNCH_ERROR, "message": msg})
            return EXIT_FAILED
        errors = self.run_dir / ERRORS_DIR
        for f in errors.glob("rank-*.json") if errors.is_dir() else []:
            f.unlink()
        offset = (self.run_dir / EVENTS_FILE).stat().st_size if (self.run_dir / EVENTS_FILE).exists() else 0

        self.world = spec.gpus
        self.rank_env = self._env(spec.gpus, gpus)
        handlers = {s: signal.getsignal(s) for s in STOP_SIGNALS}
        try:
            for s in (signal.SIGTERM, signal.SIGINT):
                signal.signal(s, self._note_stop)
            order = self._launch()
            signalled = {r.rank for r in self.ranks if r.signalled}
            return self._finish(self._cause(self._failures(order), signalled), offset)
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)

    def _launch(self) -> list[int]:
        """Run the ranks under elastic's agent; returns the failed ranks in the order elastic saw them."""
        from torch.distributed.elastic.multiprocessing import api as mp_api
        from torch.distributed.elastic.multiprocessing.api import SignalException
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.launcher.api import LaunchConfig, elastic_launch

        rank_class = _rank_handler_class()
        rank_class.launcher = self
        # The ranks' grace between SIGTERM and SIGKILL: torch 2.13's LaunchConfig takes it; a GPU box's
        # own older CUDA build of torch (2.11 on the H200 check) has no such field and keeps elastic's 30 s.
        grace = {"shutdown_timeout": int(self.args.stop_grace)}
        if "shutdown_timeout" not in {f.name for f in dataclasses.fields(LaunchConfig)}:
            grace = {}
        config = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=self.world,
            run_id=f"trainbox-{uuid.uuid4().hex[:12]}",
            rdzv_backend="c10d",
            rdzv_endpoint="localhost:0",
            local_addr="127.0.0.1",
            max_restarts=0,  # a failed run is the worker's to retry, from its checkpoint
            logs_specs=_logs_specs(),
            **grace,
        )
        args = trainer_argv(
            self.run_dir,
            model_root=self.args.model_root,
            data_root=self.args.data_root,
            save=not self.args.no_save,
            token_cache_bytes=self.args.token_cache_bytes,
            command="rank",
            spec=self.args.spec,
        )[1:]  # elastic runs them with sys.executable
        order: list[int] = []
        # Elastic's SubprocessContext makes each rank's handler through this module-level function.
        make_handler = mp_api.get_subprocess_handler

        def stop(signum: int, _frame: Any) -> None:
            # Until elastic takes the signals over (as it starts the ranks), a stop aborts the launch as
            # elastic's own handler does; whatever rank was started by then is stopped below.
            self.stop_requested = True
            raise SignalException(f"launcher got {signal.Signals(signum).name}", signal.Signals(signum))

        with (self.run_dir / LOG_FILE).open("ab") as self.log:
            try:
                for s in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(s, stop)
                if self.stop_requested:  # it came while torch was being imported
                    raise SignalException("launcher stopped before the launch", signal.SIGTERM)
                mp_api.get_subprocess_handler = rank_class
                elastic_launch(config, sys.executable)(*args)
            except ChildFailedError as e:
                order = list(e.failures)
            except SignalException:
                self.stop_requested = True
            except Exception as e:  # noqa: BLE001 - the rendezvous or the agent itself: reported as the job's error
                self.agent_error = f"elastic agent: {type(e).__name__}: {e}"
            finally:
                mp_api.get_subprocess_handler = make_handler
                for s in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(s, self._note_stop)
                self._stop_leftovers()
                for r in self.ranks:
                    r.copier.join(timeout=5)
        return order

    def _stop_leftovers(self) -> None:
        """Ranks elastic did not stop (a stop came while it was starting them): SIGTERM, then SIGKILL."""
        alive = [r for r in self.ranks if r.proc.poll() is None]
        for r in alive:
            r.close(signal.SIGTERM)
        deadline = time.monotonic() + self.args.stop_grace
        for r in alive:
            try:
                r.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                r.close(signal.SIGKILL)
                r.proc.wait()

    def _failures(self, order: list[int]) -> list[tuple[int, int]]:
        """(rank, exit code) of the ranks that failed, in the order elastic saw them, then by rank."""
        codes = {r.rank: r.proc.returncode for r in self.ranks}
        return [
            (r, codes[r])
            for r in dict.fromkeys([*order, *sorted(codes)])
            if codes.get(r) is not None and not self._stopped(codes[r])
        ]

    def _cause(self, failures: list[tuple[int, int]], killed_by_us: set[int]) -> tuple[int, int] | None:
        """The failure worth reporting: a rank killed by a signal the launcher did not send, else one
        whose error is not merely a broken connection to a peer that went first, else the first seen."""
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
        if first_failure is None and self.agent_error is not None:
            self._end("failed", {"type": ErrorType.LAUNCH_ERROR, "message": self.agent_error})
            return EXIT_FAILED
        if first_failure is None:
            # Exit 75 (checkpointed), or stopped during start-up (nothing to save yet), or never started.
            preempted = len(self.ranks) < self.world or any(r.proc.returncode != EXIT_OK for r in self.ranks)
            if not ended:
                self._end("preempted" if preempted else "succeeded")
            return EXIT_PREEMPTED if preempted else EXIT_OK
        rank, code = first_failure
        error_file = self.run_dir / ERRORS_DIR / f"rank-{rank}.json"
        if error_file.exists():
            err = json.loads(error_file.read_text())
            error = {"type": err["type"], "message": f"rank {rank}: {err['message']}", "exit_code": code}
        else:
            error = {"type": ErrorType.TRAIN_ERROR, "message": _describe_exit(rank, code), "exit_code": code}
        if not ended:
            self._end("failed", error)
        return EXIT_INVALID if error["type"] == ErrorType.INVALID else EXIT_FAILED
