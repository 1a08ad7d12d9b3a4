"""Training data: read texts, tokenize once, pack into seq_len blocks, hand each rank its share.

Packing (documents joined with EOS, cut into full blocks) means every position trains on a real
token: no padding compute, and tokens/s counts only real tokens. The order of blocks is a pure
function of (seed, epoch, step), so a resumed run sees exactly the batches the uninterrupted run
would have seen, on every rank, without saving any sampler state.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.batch import BatchPlan
from trainer.paths import DatasetInfo, SpecError

EncodeBatch = Callable[[list[str]], list[list[int]]]
CHUNK = 2048  # texts per tokenizer call: large enough for the fast tokenizer's parallelism


def read_texts(info: DatasetInfo, text_field: str) -> Iterator[str]:
    """Each record's text: one JSON object per line, or for plain text each non-blank line."""
    with info.path.open(encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            yield json.loads(line)[text_field] if info.format == "jsonl" else line


def tokenize(texts: Iterator[str], encode: EncodeBatch, eos_id: int) -> np.ndarray:
    """All texts as one token stream, each document followed by EOS so the model learns to stop."""
    parts: list[np.ndarray] = []
    chunk: list[str] = []

    def flush() -> None:
        for ids in encode(chunk):
            parts.append(np.asarray([*ids, eos_id], dtype=np.uint32))
        chunk.clear()

    for text in texts:
        chunk.append(text)
        if len(chunk) >= CHUNK:
            flush()
    if chunk:
        flush()
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)


def token_cache_path(info: DatasetInfo, text_field: str, tokenizer_id: str, cache_dir: Path) -> Path:
    """Where the tokenized corpus is cached: keyed by the file's identity and the tokenizer."""
    st = info.path.stat()
    raw = f"{info.path}|{st.st_size}|{st.st_mtime_ns}|{info.format}|{text_field}|{tokenizer_id}"
    return cache_dir / f"tokens-{hashlib.sha256(raw.encode()).hexdigest()[:16]}.npy"


def ensure_tokens(info: DatasetInfo, text_field: str, encode: EncodeBatch, eos_id: int, path: Path) -> None:
    """Tokenize into `path` once, atomically; a resumed run reuses the file."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens = tokenize(read_texts(info, text_field), encode, eos_id)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, tokens)
    os.replace(tmp, path)


@dataclass
class PackedBatches:
    """Deterministic global batches of packed blocks; rank r takes its slice of each micro-step."""

    tokens: np.ndarray
    seq_len: int
    plan: BatchPlan
    rank: int
    seed: int

    def __post_init__(self) -> None:
        self.n_blocks = len(self.tokens) // self.seq_len
        self.steps_per_epoch = self.n_blocks // self.plan.train
        if self.steps_per_epoch == 0:
            raise SpecError(
                f"dataset too small: {len(self.tokens)} tokens make {self.n_blocks} blocks of seq_len "
                f"{self.seq_len}, and one optimizer step needs train_batch_size = {self.plan.train} blocks",
                "dataset",
            )
        self._order_epoch = -1
        self._order = np.zeros(0, dtype=np.int64)

    def _order_for(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.n_blocks)
            self._order_epoch = epoch
        return self._order

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def micro_batch(self, step: int, micro_step: int) -> np.ndarray:
        """Token ids [micro, seq_len] for this rank at optimizer step `step`, micro-step `micro_step`."""
        p = self.plan
        order = self._order_for(self.epoch_of(step))
        base = (step % self.steps_per_epoch) * p.train + micro_step * p.gpus * p.micro + self.rank * p.micro
        blocks = order[base : base + p.micro]
        return np.stack([self.tokens[b * self.seq_len : (b + 1) * self.seq_len] for b in blocks]).astype(np.int64)
