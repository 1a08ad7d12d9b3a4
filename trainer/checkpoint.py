"""Atomic DeepSpeed checkpoints: written under a temp name, renamed when every rank is done.

A directory named `step-N` is always complete (it holds `trainbox.json`, written last); a crash
mid-save leaves only a `.tmp-*` directory, which the next run deletes. Resume picks the newest
complete one; the data order is a function of the step, so nothing else needs saving.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

CKPT_DIR = "checkpoints"
META = "trainbox.json"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    root = run_dir / CKPT_DIR
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        if d.name.startswith("step-") and (d / META).is_file():
            try:
                found.append((int(d.name.removeprefix("step-")), d))
            except ValueError:
                continue
    return sorted(found)


def latest(run_dir: Path) -> tuple[int, Path] | None:
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def remove_partial(run_dir: Path) -> None:
    """Delete what a save that died half-way left behind (rank 0, before anyone saves)."""
    root = run_dir / CKPT_DIR
    if root.is_dir():
        for d in root.iterdir():
            if d.name.startswith(".tmp-"):
                shutil.rmtree(d, ignore_errors=True)


def save(engine: Any, run_dir: Path, step: int, state: dict[str, Any], keep: int) -> tuple[Path, float]:
    """Collective: every rank writes its shards, then rank 0 seals the directory and prunes old ones."""
    t0 = time.perf_counter()
    root = run_dir / CKPT_DIR
    root.mkdir(exist_ok=True)
    tmp_tag, final = f".tmp-step-{step}", root / f"step-{step}"
    engine.save_checkpoint(str(root), tag=tmp_tag, client_state=state, save_latest=False)
    dist.barrier()
    if dist.get_rank() == 0:
        tmp = root / tmp_tag
        (tmp / META).write_text(json.dumps({"step": step, **state}))
        if final.exists():  # the same step saved again (end of run right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for _, old in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final, time.perf_counter() - t0


def load(engine: Any, path: Path) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and loss-scaler state; returns the saved trainer state."""
    _, client_state = engine.load_checkpoint(str(path.parent), tag=path.name)
    if client_state is None:
        raise RuntimeError(f"checkpoint {path} could not be loaded")
    return json.loads((path / META).read_text())
