"""events.jsonl: the trainer's only channel to the outside (the worker tails it; people read it)."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INVALID = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpointed on SIGTERM, run again to resume

EVENTS_FILE = "events.jsonl"
LOG_FILE = "train.log"
ERRORS_DIR = "errors"


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


def write_rank_error(run_dir: Path, rank: int, error_type: str, message: str) -> None:
    """A failing rank leaves its error for the launcher, which reports it if rank 0 could not."""
    d = run_dir / ERRORS_DIR
    d.mkdir(exist_ok=True)
    tmp = d / f".rank-{rank}.json.tmp"
    tmp.write_text(json.dumps({"rank": rank, "type": error_type, "message": message}))
    tmp.rename(d / f"rank-{rank}.json")
