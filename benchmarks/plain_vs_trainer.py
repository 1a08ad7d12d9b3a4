"""The article's plain DeepSpeed loop vs trainbox's trainer: same model, data, batch, precision, ZeRO.

    python benchmarks/plain_vs_trainer.py                       # CPU: a 4-layer Llama, 2 ranks
    python benchmarks/plain_vs_trainer.py --shape deepseek-1.3b --seq-len 2048 --batch 16 --accum 1

Both load the same saved Hugging Face directory and read the same JSONL documents. The plain loop
pads every document to seq_len (as the article does); the trainer packs. Both report real
(non-pad) tokens per second over the steps after warm-up; the ratio is trainer / plain. Runs
alternate (plain, trainer, plain, trainer, ...) so drift on a shared machine hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.bench import _WORDS, summarize  # noqa: E402
from trainer.events import read_events  # noqa: E402
from trainer.launch import visible_gpus  # noqa: E402
from trainer.presets import DEEPSEEK_1_3B, TINY  # noqa: E402

# Big enough that compute, not Python overhead, dominates a CPU step; small enough for 2 cores.
SMALL = TINY | {
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}
SHAPES = {"tiny": TINY, "small": SMALL, "deepseek-1.3b": DEEPSEEK_1_3B}


def save_model(shape: dict[str, Any], out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainer.model import load_tokenizer
    from trainer.paths import ModelSource

    cfg = dict(shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    model.save_pretrained(out)
    load_tokenizer(ModelSource("preset", "tiny")).save_pretrained(out)


def write_docs(path: Path, n: int, seq_len: int, seed: int = 0) -> None:
    """Documents of 1/8 to 1 x seq_len words (mixed lengths, as real corpora have)."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            k = rng.randint(max(4, seq_len // 8), seq_len)
            f.write(json.dumps({"text": " ".join(rng.choice(_WORDS) for _ in range(k))}) + "\n")


def free_port() -> int:
    """The plain loop's rendezvous port (it has no launcher to serve one)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rank_env(world: int, on_gpu: bool) -> dict[str, str]:
    env = dict(
        os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world), PYTHONUNBUFFERED="1"
    )
    if not on_gpu:
        env["DS_ACCELERATOR"] = "cpu"
        env.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // world)))
    return env


def run_plain(a: argparse.Namespace, work: Path, ds: dict[str, Any], on_gpu: bool, i: int) -> dict[str, Any]:
    cfg = dict(
        ds,
        optimizer={"type": "AdamW", "params": {"lr": 5e-5, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01}},
    )
    (work / "plain.json").write_text(json.dumps(cfg))
    out = work / f"plain-{i}.out.json"
    env = rank_env(a.gpus, on_gpu)
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "plain_loop.py"),
        "--model-dir",
        str(work / "models" / "bench"),
        "--corpus",
        str(work / "docs.jsonl"),
        "--config",
        str(work / "plain.json"),
        "--seq-len",
        str(a.seq_len),
        "--steps",
        str(a.steps),
        "--warmup",
        str(a.warmup),
        "--out",
        str(out),
    ]
    procs = [
        subprocess.Popen(
            cmd,
            env=env | {"RANK": str(r), "LOCAL_RANK": str(r)},
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for r in range(a.gpus)
    ]
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise SystemExit(f"plain loop failed:\n{err.decode()[-3000:]}")
    return json.loads(out.read_text())


def run_trainer(a: argparse.Namespace, work: Path, ds: dict[str, Any], i: int) -> dict[str, Any]:
    run_dir = work / f"trainer-{i}"
    run_dir.mkdir()
    spec = {
        "name": "bench",
        "model": "bench",
        "dataset": {"path": "docs.jsonl"},
        "gpus": a.gpus,
        "seq_len": a.seq_len,
        "max_steps": a.warmup + a.steps,
        "checkpoint_every": 0,
        "seed": 42,
        "deepspeed": dict(ds, optimizer={"type": "AdamW", "params": {"lr": 5e-5, "weight_decay": 0.01}}),
    }
    (run_dir / "spec.json").write_text(json.dumps(spec))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer",
            "run",
            "--no-save",
            "--spec",
            str(run_dir / "spec.json"),
            "--run-dir",
            str(run_dir),
            "--data-root",
            str(work),
            "--model-root",
            str(work / "models"),
        ],
        cwd=REPO,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return summarize(read_events(run_dir), a.warmup)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=list(SHAPES), default="small")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16, help="train_batch_size (sequences per optimizer step)")
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--gpus", type=int, default=0, help="ranks (default: visible GPUs, or 2 on CPU)")
    p.add_argument(
        "--precision",
        choices=["fp16", "bf16", "fp32"],
        default="fp16",
        help="the article's fp16 by default; CPU ranks run bf16 instead (both loops alike)",
    )
    p.add_argument("--zero", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", default="")
    a = p.parse_args()
    on_gpu = visible_gpus() > 0
    a.gpus = a.gpus or visible_gpus() or 2
    precision = a.precision if on_gpu or a.precision != "fp16" else "bf16"
    ds: dict[str, Any] = {
        "train_batch_size": a.batch,
        "gradient_accumulation_steps": a.accum,
        "zero_optimization": {"stage": a.zero},
    }
    if precision != "fp32":
        ds[precision] = {"enabled": True}

    with tempfile.TemporaryDirectory(prefix="trainbox-plain-vs-") as tmp:
        work = Path(tmp)
        save_model(SHAPES[a.shape], work / "models" / "bench")
        write_docs(work / "docs.jsonl", a.batch * (a.steps + a.warmup + 2) * 2, a.seq_len)
        plain, ours = [], []
        for i in range(a.repeats):
            plain.append(run_plain(a, work, ds, on_gpu, i))
            ours.append(run_trainer(a, work, ds, i))

    def mean(rows: list[dict[str, Any]], key: str) -> float:
        return sum(r[key] for r in rows) / len(rows)

    pt, tt = mean(plain, "tokens_per_s"), mean(ours, "tokens_per_s")
    device = ours[0].get("device")
    print(
        f"model {a.shape}, {a.gpus} ranks on {device}, seq {a.seq_len}, batch {a.batch} (accum {a.accum}), "
        f"{precision}, ZeRO-{a.zero}, {a.steps} steps after {a.warmup} warm-up, {a.repeats} alternating repeats"
    )
    print(f"{'loop':<28} {'real tokens/s':>14} {'samples/s':>10} {'pad share':>10}")
    print(
        f"{'plain (padded, article)':<28} {pt:>14,.0f} {mean(plain, 'samples_per_s'):>10.2f} "
        f"{mean(plain, 'pad_fraction'):>10.1%}"
    )
    print(f"{'trainbox trainer (packed)':<28} {tt:>14,.0f} {mean(ours, 'samples_per_s'):>10.2f} {0:>10.1%}")
    mfu = ours[0].get("mfu")
    if mfu is not None:
        print(f"trainer MFU {mean(ours, 'mfu'):.1%}, peak memory {max(r['peak_mem_gb'] for r in ours):.1f} GB/GPU")
    print(f"ratio trainer / plain (real tokens/s): {tt / pt:.2f}x")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "plain": plain, "trainer": ours, "ratio": tt / pt}))


if __name__ == "__main__":
    main()
