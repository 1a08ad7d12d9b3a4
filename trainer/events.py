"""The run contract between the trainer and everything around it, in one place: the run directory's
file names, the trainer's command line, its exit codes, its events' fields and its error types.
events.jsonl is the trainer's only channel to the outside (the worker tails it; people read it)."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from enum import StrEnum
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INVALID = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpointed on SIGTERM, run again to resume

# The run directory.
SPEC_FILE = "spec.json"  # the validated JobSpec the trainer runs
EVENTS_FILE = "events.jsonl"
LOG_FILE = "train.log"  # every rank's output, with [rank N] prefixes
LAUNCHER_LOG = "launcher.log"  # the worker's own lines about the launch (a trainer that never started)
ERRORS_DIR = "errors"
CHECKPOINTS_DIR = "checkpoints"  # checkpoints/step-N, complete ones only (trainer/checkpoint.py)
MODEL_DIR = "model"  # the final model, Hugging Face format

# The fields of a `step` event (trainer/loop.py writes them; "time" is added by EventWriter), and the
# ones the job_metrics table keeps for each step (core/models.py JobMetric; a test keeps them in step).
STEP_FIELDS = (
    "step",
    "epoch",
    "loss",
    "lr",
    "samples_per_s",
    "tokens_per_s",
    "mfu",
    "gpu_mem_gb",
    "loss_scale",
    "skipped",
    "step_time_s",
    "tokens",
    "trained_tokens_per_s",
    "trained_tokens",
    "time",
)
STEP_METRIC_FIELDS = ("step", "epoch", "loss", "lr", "samples_per_s", "tokens_per_s", "mfu", "gpu_mem_gb", "time")
# The fields of an `eval` event, and the ones job_metrics keeps on the row of the step it evaluated.
EVAL_FIELDS = ("step", "eval_loss", "perplexity", "tokens", "seconds", "time")
EVAL_METRIC_FIELDS = ("eval_loss",)


class ErrorType(StrEnum):
    """error.type of a failed run: in the `end` event and the job's error."""

    INVALID = "invalid"  # exit EXIT_INVALID: the spec, paths or data were refused
    LAUNCH_ERROR = "launch_error"
    TRAIN_ERROR = "train_error"
    OOM = "oom"
    DISK = "disk"  # a checkpoint would not fit on the run dir's filesystem, or a write ran out of space
    LOST = "lost"  # the worker's: its worker was lost (or preempted) on the last attempt
    TIMEOUT = "timeout"  # the worker's: max_runtime_s passed


# The types a trainer reports itself (LOST and TIMEOUT are the worker's).
TRAINER_ERROR_TYPES = frozenset(set(ErrorType) - {ErrorType.LOST, ErrorType.TIMEOUT})


def trainer_argv(
    run_dir: Path,
    *,
    model_root: Path | str,
    data_root: Path | str,
    save: bool = True,
    token_cache_bytes: int | None = None,
    command: str = "run",
    spec: Path | str | None = None,
) -> list[str]:
    """The trainer's command line: `python -m trainer run` on the run dir's spec.json (docs/TRAINER.md);
    `command="rank"` is how the launcher starts each rank, on the spec it was given."""
    argv = [sys.executable, "-m", "trainer", command]
    if not save:
        argv.append("--no-save")
    if token_cache_bytes is not None:
        argv += ["--token-cache-bytes", str(token_cache_bytes)]
    return argv + [
        "--spec",
        str(spec or Path(run_dir) / SPEC_FILE),
        "--run-dir",
        str(run_dir),
        "--model-root",
        str(model_root),
        "--data-root",
        str(data_root),
    ]


def _clean(value: Any) -> Any:
    """JSON has no NaN or infinity: report them as null (the step event says the loss was non-finite)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


class EventWriter:
    """Appends one JSON object per line; each line is written whole and flushed so tailers see it."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / EVENTS_FILE
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def emit(self, type_: str, **fields: Any) -> dict[str, Any]:
        event = {"type": type_, **_clean(fields), "time": round(time.time(), 3)}
        os.write(self._fd, (json.dumps(event, separators=(",", ":")) + "\n").encode())
        return event

    def close(self) -> None:
        os.close(self._fd)


def read_events(run_dir: Path, offset: int = 0) -> list[dict[str, Any]]:
    """The complete events written from byte `offset` on (a torn last line is left for later)."""
    path = run_dir / EVENTS_FILE
    if not path.exists():
        return []
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read()
    return [json.loads(line) for line in data.split(b"\n")[:-1] if line.strip()]


ERROR_FILE_RESERVE = 64 * 1024  # bytes set aside at start for a rank's error file
MAX_ERROR_MESSAGE = 16 * 1024


def _error_tmp(run_dir: Path, rank: int) -> Path:
    return run_dir / ERRORS_DIR / f".rank-{rank}.json.tmp"


def reserve_rank_error(run_dir: Path, rank: int) -> None:
    """Set aside the blocks of this rank's error file while there is room: a rank that fails because
    the disk is full can still say so (writing inside allocated blocks needs no free space)."""
    try:
        (run_dir / ERRORS_DIR).mkdir(exist_ok=True)
        fd = os.open(_error_tmp(run_dir, rank), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.posix_fallocate(fd, 0, ERROR_FILE_RESERVE)
        finally:
            os.close(fd)
    except OSError:
        pass  # no room even for this, or no fallocate here: the error file is written the usual way


def write_rank_error(run_dir: Path, rank: int, error_type: str, message: str) -> None:
    """A failing rank leaves its error for the launcher, which reports it if rank 0 could not."""
    d = run_dir / ERRORS_DIR
    d.mkdir(exist_ok=True)
    tmp = _error_tmp(run_dir, rank)
    data = json.dumps({"rank": rank, "type": error_type, "message": message[:MAX_ERROR_MESSAGE]}).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o644)  # into the reserved blocks, if any: no O_TRUNC
    try:
        os.write(fd, data)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)
    tmp.rename(d / f"rank-{rank}.json")


def remove_error_reserves(run_dir: Path) -> None:
    """The launcher, once every rank is gone: the blocks no rank needed go back."""
    d = run_dir / ERRORS_DIR
    for f in d.glob(".rank-*.json.tmp") if d.is_dir() else []:
        f.unlink(missing_ok=True)
