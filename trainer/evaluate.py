"""Eval loss on the validation blocks, and the token-summed loss training uses too.

Eval loss is the mean over every trained validation token on every rank (sums and counts are
all-reduced, not per-rank means averaged), computed without gradients in eval mode, with the same
masking as training. Every rank runs the same number of forward passes (slots past the end of its
share are padding with no label), which ZeRO-3's parameter gathering needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainer.data import IGNORE, TRAINED


def loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over positions whose label is not IGNORE (fp32)."""
    vocab = logits.shape[-1]
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, vocab).float(), labels[:, 1:].reshape(-1), ignore_index=IGNORE, reduction="sum"
    )


@dataclass
class EvalBlocks:
    """The validation blocks, rank r taking blocks r, r + world, ... in micro-batches of `micro`."""

    tokens: np.ndarray
    mask: np.ndarray
    seq_len: int
    micro: int
    rank: int
    world: int

    def __post_init__(self) -> None:
        self.n_blocks = len(self.tokens) // self.seq_len
        per_rank = -(-self.n_blocks // self.world)
        self.n_micro = max(1, -(-per_rank // self.micro))

    def micro_batches(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(ids, labels) [micro, seq_len] for this rank, the same count on every rank."""
        mine = list(range(self.rank, self.n_blocks, self.world))
        out = []
        for i in range(self.n_micro):
            rows = mine[i * self.micro : (i + 1) * self.micro]
            ids = np.zeros((self.micro, self.seq_len), dtype=np.int64)
            labels = np.full((self.micro, self.seq_len), IGNORE, dtype=np.int64)
            for j, b in enumerate(rows):
                sl = slice(b * self.seq_len, (b + 1) * self.seq_len)
                ids[j] = self.tokens[sl]
                labels[j] = np.where(self.mask[sl] == TRAINED, ids[j], IGNORE)
            out.append((ids, labels))
        return out


@torch.no_grad()
def evaluate(engine: Any, blocks: EvalBlocks, device: torch.device) -> tuple[float, int]:
    """(token-weighted mean loss over all ranks, trained tokens counted); the model is back in train mode after."""
    engine.eval()
    try:
        total = torch.zeros(2, dtype=torch.float64, device=device)
        for ids, labels in blocks.micro_batches():
            ids_t = torch.from_numpy(ids).to(device)
            labels_t = torch.from_numpy(labels).to(device)
            out = engine(input_ids=ids_t)
            total[0] += loss_sum(out.logits, labels_t).double()
            total[1] += (labels_t[:, 1:] != IGNORE).sum()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    finally:
        engine.train()
    count = int(total[1].item())
    return (total[0].item() / count if count else math.nan), count


def perplexity(loss: float) -> float | None:
    """exp(loss), None where it overflows or the loss is not a number."""
    if not math.isfinite(loss) or loss > 700:
        return None
    return math.exp(loss)
