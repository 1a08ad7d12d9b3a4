"""A job's files under its run directory: the final model, checkpoints, the training log."""

from __future__ import annotations

import os
import re
from collections import deque
from pathlib import Path

from api.errors import NotFound

DOWNLOADABLE = ("model", "checkpoints")
_STEP = re.compile(r"^step-(\d+)$")


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def list_artifacts(run_dir: Path) -> dict[str, list[dict[str, object]]]:
    """{"model": [{name, size}], "checkpoints": [{name, step, size}]}, names relative to the run dir."""
    model_dir = run_dir / "model"
    model = []
    if model_dir.is_dir() and not model_dir.is_symlink():
        for p in sorted(model_dir.rglob("*")):
            if p.is_file() and not p.is_symlink():
                model.append({"name": p.relative_to(run_dir).as_posix(), "size": p.stat().st_size})
    checkpoints = []
    ckpt_dir = run_dir / "checkpoints"
    if ckpt_dir.is_dir() and not ckpt_dir.is_symlink():
        for p in ckpt_dir.iterdir():
            m = _STEP.match(p.name)
            if m and p.is_dir() and not p.is_symlink():
                checkpoints.append({"name": f"checkpoints/{p.name}", "step": int(m.group(1)), "size": _size(p)})
    checkpoints.sort(key=lambda c: c["step"])  # type: ignore[arg-type, return-value]
    return {"model": model, "checkpoints": checkpoints}


def artifact_path(run_dir: Path, name: str) -> Path:
    """The file `name` under the run dir's model/ or checkpoints/; 404 for anything else (no traversal)."""
    parts = name.replace("\\", "/").split("/")
    if not name or name.startswith("/") or ".." in parts or "\x00" in name or parts[0] not in DOWNLOADABLE:
        raise NotFound(f"no artifact named {name!r}", ["path", "name"])
    root = run_dir.resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root / parts[0]) or not path.is_file():
        raise NotFound(f"no artifact named {name!r}", ["path", "name"])
    return path


def tail_lines(path: Path, n: int, block: int = 64 * 1024) -> list[str]:
    """The last n lines of a text file, reading from the end (logs can be large)."""
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        end = f.tell()
        data = b""
        while end > 0 and data.count(b"\n") <= n:
            start = max(0, end - block)
            f.seek(start)
            data = f.read(end - start) + data
            end = start
    lines: deque[str] = deque(maxlen=n)
    for line in data.decode("utf-8", "replace").splitlines():
        lines.append(line)
    return list(lines)
