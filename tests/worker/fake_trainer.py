"""A stand-in for `python -m trainer run` in supervisor tests: writes events and log lines the way the
trainer does (docs/TRAINER.md), and obeys SIGTERM by checkpointing and exiting 75."""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

STUBBORN_CHILD = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--step-s", type=float, default=0.02)
    p.add_argument("--exit", type=int, default=0)
    p.add_argument("--error-type", default=None)
    p.add_argument("--stubborn-child", action="store_true", help="leave a child that ignores SIGTERM")
    p.add_argument("--ignore-term", action="store_true")
    p.add_argument("--start-after", type=float, default=0.0, help="seconds before the start event (SIGTERM kills)")
    p.add_argument("--alloc-log", type=Path, help="append 'start|end job devices time' lines here")
    p.add_argument("--label", default="", help="'job:devices' for the allocation log")
    p.add_argument("--checkpoint-every", type=int, default=0, help="write checkpoints/step-N (and its event)")
    p.add_argument("--checkpoint-bytes", type=int, default=1000, help="size of each checkpoint's one file")
    a = p.parse_args()
    if a.alloc_log:
        with a.alloc_log.open("a") as f:  # one short write per line: appends from many processes stay whole
            f.write(f"start {a.label} {time.time()}\n")
    events = (a.run_dir / "events.jsonl").open("a", buffering=1)
    log = (a.run_dir / "train.log").open("a", buffering=1)
    step = 0

    def emit(type_: str, **fields: object) -> None:
        events.write(json.dumps({"type": type_, **fields, "time": time.time()}) + "\n")

    def on_term(*_: object) -> None:
        emit("checkpoint", step=step, path=f"checkpoints/step-{step}", seconds=0.0)
        emit("end", status="preempted", step=step, error=None)
        sys.exit(75)

    if a.stubborn_child:
        subprocess.Popen([sys.executable, "-c", STUBBORN_CHILD])
    if a.start_after:
        log.write("[rank 0] waiting on something before start\n")
        time.sleep(a.start_after)
    signal.signal(signal.SIGTERM, signal.SIG_IGN if a.ignore_term else on_term)
    emit("start", world_size=2, total_steps=a.steps, resumed_from_step=0)
    for step in range(1, a.steps + 1):
        time.sleep(a.step_s)
        emit(
            "step",
            step=step,
            epoch=0,
            loss=10.0 / step,
            lr=1e-3,
            samples_per_s=100.0,
            tokens_per_s=6400.0,
            mfu=None,
            gpu_mem_gb=None,
        )
        log.write(f"[rank 0] step {step}/{a.steps}\n")
        if a.checkpoint_every and step % a.checkpoint_every == 0:
            ckpt = a.run_dir / "checkpoints" / f"step-{step}"
            ckpt.mkdir(parents=True)
            (ckpt / "shard.pt").write_bytes(b"\0" * a.checkpoint_bytes)
            emit("checkpoint", step=step, path=f"checkpoints/step-{step}", seconds=0.0)
    if a.exit == 0:
        emit("end", status="succeeded", step=step, error=None, model_path="model")
    else:
        log.write("[rank 1] Traceback (most recent call last):\n[rank 1] RuntimeError: boom\n")
        error = {"type": a.error_type, "message": "boom"} if a.error_type else None
        emit("end", status="failed", step=step, error=error)
    if a.alloc_log:
        with a.alloc_log.open("a") as f:
            f.write(f"end {a.label} {time.time()}\n")
    sys.exit(a.exit)


if __name__ == "__main__":
    main()
