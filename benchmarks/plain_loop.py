"""The source article's training loop, as it describes it, for side-by-side comparison.

A Hugging Face model and tokenizer from a directory, each document padded to seq_len (input_ids,
attention_mask, labels = input_ids), a DistributedSampler, `deepspeed.initialize(model,
model_parameters, config)` with the optimizer from the config, then engine(...), engine.backward(loss),
engine.step(). One process per rank (started by plain_vs_trainer.py with RANK/WORLD_SIZE set).
Rank 0 writes a JSON line of measurements: real (non-pad) tokens/s over the steps after warm-up.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from torch.utils.data import DataLoader, DistributedSampler
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", required=True)
    p.add_argument("--corpus", required=True)
    p.add_argument("--config", required=True, help="DeepSpeed config JSON")
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), verbose=False)
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(dist.get_rank())
    else:
        torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", "1")))
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    config = json.loads(Path(args.config).read_text())
    torch.manual_seed(42)

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, local_files_only=True, attn_implementation="sdpa")
    texts = [json.loads(line)["text"] for line in Path(args.corpus).read_text().splitlines() if line.strip()]
    enc = tokenizer(texts, truncation=True, max_length=args.seq_len, padding="max_length", return_tensors="pt")
    pairs = zip(enc["input_ids"], enc["attention_mask"], strict=True)
    dataset = [{"input_ids": i, "attention_mask": m} for i, m in pairs]
    sampler = DistributedSampler(dataset, shuffle=True, seed=42)
    micro = config["train_batch_size"] // (config["gradient_accumulation_steps"] * dist.get_world_size())
    loader = DataLoader(dataset, batch_size=micro, sampler=sampler, drop_last=True)

    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    accum = engine.gradient_accumulation_steps()
    dtype_note = next((k for k in ("bf16", "fp16") if config.get(k, {}).get("enabled")), "fp32")

    real = torch.zeros((), device=device, dtype=torch.long)
    measured_tokens = 0
    measured_time = 0.0
    step, micro = 0, 0
    t0 = time.perf_counter()
    epoch = 0
    while step < args.warmup + args.steps:
        sampler.set_epoch(epoch)
        for batch in loader:
            ids = batch["input_ids"].to(device)
            mask = batch["attention_mask"].to(device)
            out = engine(input_ids=ids, attention_mask=mask, labels=ids)
            engine.backward(out.loss)
            engine.step()
            real += mask.sum()
            micro += 1
            if micro % accum:
                continue
            dist.all_reduce(real)  # also the synchronization point for timing
            now = time.perf_counter()
            step += 1
            if step > args.warmup:
                measured_tokens += int(real.item())
                measured_time += now - t0
            real.zero_()
            t0 = time.perf_counter()
            if step >= args.warmup + args.steps:
                break
        epoch += 1

    if dist.get_rank() == 0:
        samples = config["train_batch_size"] * args.steps
        Path(args.out).write_text(
            json.dumps(
                {
                    "tokens_per_s": measured_tokens / measured_time,
                    "samples_per_s": samples / measured_time,
                    "pad_fraction": 1 - measured_tokens / (samples * args.seq_len),
                    "precision": dtype_note,
                }
            )
        )
    dist.barrier()


if __name__ == "__main__":
    main()
