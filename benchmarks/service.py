"""What the service costs a job: throughput, time to first step, and live-stream latency.

    python benchmarks/service.py

Starts the embedded stack (`trainbox up`'s Stack: SQLite, its own Redis, uvicorn, a Celery worker
with 2 CPU slots) in a temporary data dir, then alternates, `--repeats` times:
  plain:   `python -m trainer run` on the spec directly (what a person would do by hand);
  service: the same spec POSTed to /jobs, run by the worker's supervisor.
For each, tokens/s over the steps after warm-up and the time from launch (plain) or from the POST
(service) to the first step event. Then one longer service job is followed over SSE: for every
step event, the time from the trainer writing it (its `time` field) to the client receiving it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from client.sdk import Client  # noqa: E402
from client.stack import Stack, free_port  # noqa: E402
from trainer.bench import summarize  # noqa: E402
from trainer.events import read_events  # noqa: E402

WORDS = "the quick brown fox jumps over the lazy dog and then runs back home to sleep".split()  # noqa: SIM905


def spec(name: str, steps: int, seq_len: int = 128, batch: int = 16) -> dict[str, Any]:
    return {
        "name": name,
        "model": "preset:tiny",
        "dataset": {"path": "bench.jsonl"},
        "gpus": 2,
        "seq_len": seq_len,
        "max_steps": steps,
        "checkpoint_every": 0,
        "max_runtime_s": 3600,
        "deepspeed": {
            "train_batch_size": batch,
            "gradient_accumulation_steps": 1,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        },
    }


def first_step_after(events: list[dict[str, Any]], t0: float) -> float:
    return next(e["time"] for e in events if e["type"] == "step") - t0


def run_plain(data_dir: Path, s: dict[str, Any], i: int, warmup: int) -> dict[str, Any]:
    run_dir = data_dir / "plain" / str(i)
    run_dir.mkdir(parents=True)
    (run_dir / "spec.json").write_text(json.dumps(s))
    t0 = time.time()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer",
            "run",
            "--spec",
            str(run_dir / "spec.json"),
            "--run-dir",
            str(run_dir),
            "--data-root",
            str(data_dir / "data"),
            "--model-root",
            str(data_dir / "models"),
        ],
        cwd=REPO,
        check=True,
        stdout=subprocess.DEVNULL,
        env={"CUDA_VISIBLE_DEVICES": "", **_env()},
    )
    evs = read_events(run_dir)
    return {"to_first_step_s": first_step_after(evs, t0), **summarize(evs, warmup)}


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


def run_service(client: Client, data_dir: Path, s: dict[str, Any], warmup: int) -> dict[str, Any]:
    t0 = time.time()
    job = client.submit(s)
    while client.get(job["id"])["state"] not in ("succeeded", "failed", "cancelled"):
        time.sleep(0.2)
    final = client.get(job["id"])
    if final["state"] != "succeeded":
        raise SystemExit(f"service job {job['id']} ended {final['state']}: {final.get('error')}")
    evs = read_events(data_dir / "runs" / job["id"])
    return {"to_first_step_s": first_step_after(evs, t0), **summarize(evs, warmup)}


def stream_latency(client: Client, s: dict[str, Any]) -> list[float]:
    """Receive time minus the trainer's write time, for every step event of one job, in ms."""
    job = client.submit(s)
    latencies: list[float] = []
    done = threading.Event()

    def follow() -> None:
        for ev in client.events(job["id"]):
            if ev.type in ("metric", "step") and isinstance(ev.data.get("time"), int | float):
                latencies.append((time.time() - ev.data["time"]) * 1000)
        done.set()

    threading.Thread(target=follow, daemon=True).start()
    done.wait(timeout=900)
    return latencies


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--stream-steps", type=int, default=200)
    a = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="trainbox-svc-bench-") as tmp:
        data_dir = Path(tmp)
        (data_dir / "data").mkdir()
        with (data_dir / "data" / "bench.jsonl").open("w") as f:
            for i in range(3000):
                f.write(json.dumps({"text": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(40))}) + "\n")
        stack = Stack(
            data_dir=data_dir, port=free_port(), extra_env={"CUDA_VISIBLE_DEVICES": "", "TRAINBOX_CPU_SLOTS": "2"}
        )
        stack.start(on_step=lambda _msg: None)
        try:
            token_file = data_dir / "token"
            token = token_file.read_text().strip() if token_file.exists() else None
            client = Client(stack.url, token=token)
            plain, service = [], []
            for i in range(a.repeats):
                plain.append(run_plain(data_dir, spec(f"plain-{i}", a.steps + a.warmup), i, a.warmup))
                service.append(run_service(client, data_dir, spec(f"svc-{i}", a.steps + a.warmup), a.warmup))
            lat = stream_latency(client, spec("stream", a.stream_steps, seq_len=32, batch=2))
        finally:
            stack.stop()

    def mean(rows: list[dict[str, Any]], key: str) -> float:
        return sum(r[key] for r in rows) / len(rows)

    pt, st = mean(plain, "tokens_per_s"), mean(service, "tokens_per_s")
    pf, sf = mean(plain, "to_first_step_s"), mean(service, "to_first_step_s")
    print(
        f"tiny preset, 2 CPU ranks, seq 128, batch 16, {a.steps} steps after {a.warmup} warm-up, "
        f"{a.repeats} alternating repeats"
    )
    print(f"{'':<10} {'tokens/s':>10} {'to first step':>14}")
    print(f"{'plain':<10} {pt:>10,.0f} {pf:>13.2f}s")
    print(f"{'service':<10} {st:>10,.0f} {sf:>13.2f}s")
    print(f"throughput ratio service / plain: {st / pt:.3f} (goal >= 0.97)")
    print(f"extra time from submit to first step: {sf - pf:+.2f}s (goal <= 1.5 s)")
    print(
        f"stream latency over {len(lat)} step events: p50 {pct(lat, 50):.1f} ms, p95 {pct(lat, 95):.1f} ms, "
        f"max {max(lat):.1f} ms (goal p95 <= 100 ms)"
    )


if __name__ == "__main__":
    main()
