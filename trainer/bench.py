"""`python -m trainer bench`: the article's table (batch size -> samples/s, tokens/s, memory), measured.

Each batch size is a real training run through the launcher (fresh processes, so peak memory is
per configuration) on synthetic packed text, checkpoints off; the first `--warmup` steps (kernel
selection, allocator growth, JIT) are excluded from the averages.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from trainer.events import SPEC_FILE, read_events, trainer_argv
from trainer.launch import visible_gpus

# A fixed vocabulary of common English and code words: realistic token lengths for the tokenizer.
_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "with",
    "as",
    "was",
    "on",
    "be",
    "by",
    "this",
    "are",
    "from",
    "at",
    "or",
    "an",
    "have",
    "not",
    "which",
    "def",
    "return",
    "self",
    "import",
    "class",
    "if",
    "else",
    "while",
    "for",
    "in",
    "range",
    "print",
    "value",
    "data",
    "model",
    "train",
    "loss",
    "step",
    "batch",
    "token",
    "layer",
    "weight",
    "gradient",
    "optimizer",
    "learning",
    "rate",
    "memory",
    "device",
    "tensor",
    "shape",
    "output",
    "input",
    "error",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="preset:deepseek-1.3b")
    p.add_argument("--batch-sizes", default="16,32,64", help="global batch sizes (sequences per step)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--gpus", type=int, default=0, help="ranks (default: every visible GPU, or 2 on CPU)")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--zero", type=int, default=2, choices=[0, 1, 2, 3])
    p.add_argument("--max-micro", type=int, default=8, help="largest per-GPU micro batch; accumulation covers the rest")
    p.add_argument("--steps", type=int, default=10, help="measured steps per batch size")
    p.add_argument("--warmup", type=int, default=3, help="steps run first and excluded")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--model-root", default=".")
    p.add_argument("--work-dir", default="", help="where runs go (default: a temporary directory)")
    p.add_argument("--json", default="", help="also write the results here")


def write_corpus(path: Path, tokens_needed: int, seed: int = 0) -> None:
    """Random sentences, roughly 1.3 tokens a word; a margin so packing never runs short."""
    rng = random.Random(seed)
    words = int(tokens_needed * 1.2) + 1000
    with path.open("w") as f:
        while words > 0:
            n = rng.randint(50, 400)
            f.write(" ".join(rng.choice(_WORDS) for _ in range(n)) + "\n")
            words -= n


def pick_micro(batch: int, gpus: int, max_micro: int) -> int | None:
    """The largest per-GPU micro batch <= max_micro that divides batch / gpus."""
    if batch % gpus:
        return None
    per_gpu = batch // gpus
    return max(m for m in range(1, min(max_micro, per_gpu) + 1) if per_gpu % m == 0)


def summarize(events: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """Averages over the measured steps: totals over total time, not a mean of per-step rates."""
    start = next((e for e in events if e["type"] == "start"), {})
    steps = [e for e in events if e["type"] == "step" and e["step"] > warmup]
    end = next((e for e in events if e["type"] == "end"), {})
    if not steps:
        return {"status": end.get("status", "failed"), "error": end.get("error")}
    seconds = sum(e["step_time_s"] for e in steps)
    samples = start.get("train_batch_size", 0) * len(steps)
    mfus = [e["mfu"] for e in steps if e.get("mfu") is not None]
    mems = [e["gpu_mem_gb"] for e in steps if e.get("gpu_mem_gb") is not None]
    return {
        "status": end.get("status", "running"),
        "error": end.get("error"),
        "steps": len(steps),
        "samples_per_s": samples / seconds,
        "tokens_per_s": samples * start.get("seq_len", 0) / seconds,
        "mfu": sum(mfus) / len(mfus) if mfus else None,
        "peak_mem_gb": max(mems) if mems else None,
        "precision": start.get("precision"),
        "device": start.get("device"),
        "micro": start.get("micro_batch"),
        "accum": start.get("grad_accum"),
    }


def run_one(args: argparse.Namespace, batch: int, gpus: int, work: Path) -> dict[str, Any]:
    micro = pick_micro(batch, gpus, args.max_micro)
    if micro is None:
        return {"batch_size": batch, "status": "skipped", "error": {"message": f"{batch} is not divisible by {gpus}"}}
    run_dir = work / f"bs{batch}"
    run_dir.mkdir(parents=True, exist_ok=True)
    corpus = run_dir / "corpus.txt"
    write_corpus(corpus, batch * args.seq_len * (args.steps + args.warmup + 1))
    ds: dict[str, Any] = {
        "train_batch_size": batch,
        "train_micro_batch_size_per_gpu": micro,
        "zero_optimization": {"stage": args.zero},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01}},
    }
    if args.precision != "fp32":
        ds[args.precision] = {"enabled": True}
    spec = {
        "name": f"bench-{batch}",
        "model": args.model,
        "dataset": {"path": "corpus.txt", "format": "text"},
        "gpus": gpus,
        "seq_len": args.seq_len,
        "max_steps": args.warmup + args.steps,
        "checkpoint_every": 0,
        "gradient_checkpointing": args.gradient_checkpointing,
        "deepspeed": ds,
    }
    (run_dir / SPEC_FILE).write_text(json.dumps(spec))
    cmd = trainer_argv(run_dir, model_root=args.model_root, data_root=run_dir, save=False)
    subprocess.run(cmd, check=False)
    return {"batch_size": batch, **summarize(read_events(run_dir), args.warmup)}


def format_row(r: dict[str, Any]) -> str:
    if "samples_per_s" not in r:
        err = (r.get("error") or {}).get("message", r.get("status"))
        return f"{r['batch_size']:>6}  {r['status']}: {err}"
    mem = f"{r['peak_mem_gb']:.1f}" if r["peak_mem_gb"] is not None else "-"
    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
    return (
        f"{r['batch_size']:>6}  {r['micro']:>3}x{r['accum']:<3} {r['samples_per_s']:>10.2f} "
        f"{r['tokens_per_s']:>12,.0f} {mem:>10} {mfu:>7}"
    )


def main(args: argparse.Namespace) -> int:
    gpus = args.gpus or visible_gpus() or 2
    batches = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    with tempfile.TemporaryDirectory(prefix="trainbox-bench-") as tmp:
        work = Path(args.work_dir or tmp)
        results = [run_one(args, b, gpus, work) for b in batches]
    device = next((r["device"] for r in results if r.get("device")), "?")
    precision = next((r["precision"] for r in results if r.get("precision")), args.precision)
    print(
        f"\n{args.model} on {gpus} x {device}, seq {args.seq_len}, {precision}, ZeRO-{args.zero}, "
        f"{args.steps} measured steps after {args.warmup} warm-up"
    )
    print(f"{'batch':>6}  {'micro':>3}x{'acc':<3} {'samples/s':>10} {'tokens/s':>12} {'mem GB/GPU':>10} {'MFU':>7}")
    for r in results:
        print(format_row(r))
    if args.json:
        Path(args.json).write_text(json.dumps({"gpus": gpus, "model": args.model, "results": results}, indent=2))
    return 0 if all(r.get("status") == "succeeded" for r in results) else 1
