"""Atomic DeepSpeed checkpoints: written under a temp name, renamed when every rank is done.

A directory named `step-N` is always complete (it holds `trainbox.json`, written last); a crash
mid-save leaves only a `.tmp-*` directory, which the next run deletes. Resume picks the newest
complete one; the data order is a function of the step, so nothing else needs saving.

Disk: before each save every rank learns the free space on the checkpoints' filesystem (rank 0
measures it) and all fail together with DiskFull (error type `disk`) when it is below the estimate
of the checkpoint's size; a write that runs out of space anyway (another job filled the disk) removes
its temp directory and fails the same way. Either way the newest complete checkpoint stays the newest.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trainer.events import CHECKPOINTS_DIR
from trainer.units import human_bytes

META = "trainbox.json"

# What a DeepSpeed checkpoint holds per parameter, all ranks together (measured on DeepSpeed 0.19 for
# ZeRO 0-3, fp32 and bf16: tests/trainer/test_disk.py): the module's weights in the training precision
# (stages 0-2; ZeRO-3 keeps them only partitioned, inside the optimizer state) plus the fp32 master
# weights and Adam's two moments (12 bytes). Stage 0 in fp32 has no separate master copy: 4 bytes
# counted that are not written. Pickle headers and ZeRO's padding are what the margin is for.
OPTIMIZER_BYTES_PER_PARAM = 12
ESTIMATE_MARGIN = 1.05
OVERHEAD_PER_FILE = 1 << 20  # one model-states and one optimizer-states file per rank, at most
FULL_BELOW = 1 << 20  # a failed write with less free than this: the disk filled up
_OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_TEXT = re.compile(r"No space left on device|Disk quota exceeded")
# torch.save's C++ writer hides the errno of a failed write behind these.
_WRITE_FAILED_TEXT = re.compile(r"PytorchStreamWriter failed|unexpected pos \d+ vs|file write failed")


class DiskFull(RuntimeError):
    """The checkpoint does not fit (or did not) on the run directory's filesystem: error type `disk`."""


def estimate_bytes(n_params: int, precision: str, zero_stage: int, world_size: int) -> int:
    """A checkpoint's size on disk, on the safe side: what save() requires free before it writes."""
    weights = 0 if zero_stage == 3 else (4 if precision == "fp32" else 2)
    body = n_params * (weights + OPTIMIZER_BYTES_PER_PARAM) * ESTIMATE_MARGIN
    return int(body) + OVERHEAD_PER_FILE * 2 * world_size


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The error and the ones it came from (each one's cause, else its context)."""
    seen: BaseException | None = exc
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__


def out_of_space(exc: BaseException) -> bool:
    """Whether an error (or one it came from) is a filesystem out of space or over its quota."""
    return any(
        (isinstance(e, OSError) and e.errno in _OUT_OF_SPACE) or _NO_SPACE_TEXT.search(str(e)) for e in _chain(exc)
    )


def _write_failed(exc: BaseException) -> bool:
    """A failed write while saving: out of space, an I/O error, or torch's writer giving up."""
    return out_of_space(exc) or any(
        (isinstance(e, OSError) and not isinstance(e, ConnectionError)) or _WRITE_FAILED_TEXT.search(str(e))
        for e in _chain(exc)
    )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    root = run_dir / CHECKPOINTS_DIR
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
    """Delete what a save that died half-way left behind (rank 0 before anyone saves; the launcher
    once every rank is gone)."""
    root = run_dir / CHECKPOINTS_DIR
    if root.is_dir():
        for d in root.iterdir():
            if d.name.startswith(".tmp-"):
                shutil.rmtree(d, ignore_errors=True)
    shutil.rmtree(run_dir / ".tmp-model", ignore_errors=True)  # a final model cut short


def ensure_space(root: Path, step: int, needed: int, device: Any = None) -> None:
    """Collective: DiskFull on every rank when root's filesystem has less than `needed` bytes free.

    Rank 0 measures and tells the others, so all ranks decide alike (a rank that went on alone
    would wait for the others in the save's collectives)."""
    mine = float(shutil.disk_usage(root).free) if dist.get_rank() == 0 else 0.0
    free_t = torch.tensor([mine], dtype=torch.float64, device=device)
    dist.broadcast(free_t, src=0)
    free = int(free_t.item())
    if free < needed:
        raise DiskFull(
            f"not enough disk space for checkpoint step-{step}: it needs about {human_bytes(needed)} "
            f"({needed} bytes, estimated) and {human_bytes(free)} ({free} bytes) is free on the filesystem of "
            f"{root}; free space there (trainbox prune deletes finished jobs' checkpoints), then run the job again"
        )


def _failed_write(exc: BaseException, root: Path, tmp: Path, step: int, needed: int | None) -> DiskFull:
    """The partial checkpoint removed, and what to report: how much was free when the write failed."""
    free = shutil.disk_usage(root).free  # before the partial goes: what the write left
    shutil.rmtree(tmp, ignore_errors=True)
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    full = out_of_space(exc) or free < FULL_BELOW
    why = "the filesystem is full" if full else f"write failed ({type(exc).__name__}: {first})"
    wanted = f", about {human_bytes(needed)} needed" if needed else ""
    return DiskFull(
        f"checkpoint step-{step} could not be written to {root}: {why}; {human_bytes(free)} ({free} bytes) "
        f"was free when it failed{wanted}; the partial checkpoint was removed and step-{step} was not kept"
    )


def save(
    engine: Any,
    run_dir: Path,
    step: int,
    state: dict[str, Any],
    keep: int,
    *,
    needed: int | None = None,
    device: Any = None,
    also_keep: int | None = None,
) -> tuple[Path, float]:
    """Collective: every rank writes its shards, then rank 0 seals the directory and prunes old ones.

    `needed`: bytes that must be free first (estimate_bytes), else DiskFull on every rank; None: no check.
    `also_keep`: a step kept out of the rotation (the best checkpoint, keep_best)."""
    t0 = time.perf_counter()
    root = run_dir / CHECKPOINTS_DIR
    root.mkdir(exist_ok=True)
    tmp_tag, final = f".tmp-step-{step}", root / f"step-{step}"
    tmp = root / tmp_tag
    if needed is not None:
        ensure_space(root, step, needed, device)
    try:
        engine.save_checkpoint(str(root), tag=tmp_tag, client_state=state, save_latest=False)
        dist.barrier()
        if dist.get_rank() == 0:
            (tmp / META).write_text(json.dumps({"step": step, **state}))
    except Exception as exc:
        # A rank whose peer failed sees only a broken collective: that is re-raised as it is.
        if _write_failed(exc):
            raise _failed_write(exc, root, tmp, step, needed) from exc
        raise
    if dist.get_rank() == 0:
        if final.exists():  # the same step saved again (end of run right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old_step, old in complete_checkpoints(run_dir)[:-keep]:
            if old_step != also_keep:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final, time.perf_counter() - t0


def load(engine: Any, path: Path) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and loss-scaler state; returns the saved trainer state."""
    _, client_state = engine.load_checkpoint(str(path.parent), tag=path.name)
    if client_state is None:
        raise RuntimeError(f"checkpoint {path} could not be loaded")
    return json.loads((path / META).read_text())
