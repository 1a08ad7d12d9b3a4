"""Data start-up of a job, cold (tokenize) and warm (the token cache under the data root).

    python benchmarks/tokens.py                  # ~100 MB of chat JSONL, preset tokenizer, seq_len 1024
    python benchmarks/tokens.py --mb 20 --format text

What a rank does with its data before the first step, on one process: the full check of every record
(trainer.paths.inspect_data), the cache key (sha256 of the files), and trainer.data.prepare: cold
(render, tokenize, mask, pack, write) and warm (the entry exists: memory-map it). The rest of a job's
start-up (torch import, process group, DeepSpeed engine) does not depend on the data.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer import model as models  # noqa: E402
from trainer.data import DataOptions, cache_key, prepare  # noqa: E402
from trainer.paths import ModelSource, inspect_data  # noqa: E402
from trainer.spec import JobSpec  # noqa: E402

WORDS = "the of and to in is that for it with as was on be by this are from at or def return self".split()  # noqa: SIM905


def write_data(path: Path, mb: int, fmt: str) -> int:
    rng = random.Random(0)
    n = 0
    with path.open("w") as f:
        while f.tell() < mb * 10**6:

            def words(k: int) -> str:
                return " ".join(rng.choice(WORDS) for _ in range(k))

            if fmt == "chat":
                rec = {
                    "messages": [
                        {"role": "system", "content": "Be brief."},
                        {"role": "user", "content": words(40)},
                        {"role": "assistant", "content": words(120)},
                    ]
                }
            else:
                rec = {"text": words(160)}
            f.write(json.dumps(rec) + "\n")
            n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--format", choices=["chat", "text"], default="chat")
    ap.add_argument("--seq-len", type=int, default=1024)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        records = write_data(root / "train.jsonl", args.mb, args.format)
        spec = JobSpec(
            name="b", model="preset:tiny", dataset={"path": "train.jsonl"}, seq_len=args.seq_len, validation_split=0.01
        )
        tok = models.load_tokenizer(ModelSource("preset", "tiny"))
        rows = []
        for run in ("cold", "warm"):
            t0 = time.perf_counter()
            info, val = inspect_data(spec, root)
            t1 = time.perf_counter()
            enc = models.encoder(tok, info.data_format)
            opts = DataOptions(
                format=info.data_format,
                text_field="text",
                val_text_field="text",
                train_all=info.data_format == "text",
                overlong="drop",
                seq_len=args.seq_len,
                split=spec.validation_split,
                seed=spec.seed,
                tokenizer="preset:tiny",
                template=models.template_id(tok),
            )
            key = cache_key(info, val, opts)
            t2 = time.perf_counter()
            data = prepare(info, val, opts, enc, root / ".cache", build=True, key=key)
            t3 = time.perf_counter()
            rows.append((run, t1 - t0, t2 - t1, t3 - t2, t3 - t0, data.built))
        stats = data.stats["train"]
    print(
        f"{args.mb} MB of {args.format} JSONL ({records} records), seq_len {args.seq_len}, preset tokenizer, "
        f"{platform.processor() or platform.machine()}, 1 process"
    )
    print(
        f"train: {stats['tokens']:,} tokens in {stats['blocks']:,} blocks, {stats['trained_tokens']:,} trained, "
        f"{stats['dropped']} dropped"
    )
    print(f"{'run':<5} {'check s':>8} {'hash s':>7} {'prepare s':>10} {'total s':>8}  tokenized")
    for run, check, hashing, prep, total, built in rows:
        print(f"{run:<5} {check:>8.2f} {hashing:>7.2f} {prep:>10.2f} {total:>8.2f}  {built}")


if __name__ == "__main__":
    main()
