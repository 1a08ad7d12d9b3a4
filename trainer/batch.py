"""DeepSpeed batch arithmetic: train_batch_size = micro x accumulation x GPUs.

DeepSpeed checks this at start-up, after the job has waited in the queue; trainbox checks it at
submission and, when it fails, names the valid choices nearest to what was asked.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchPlan:
    train: int
    micro: int
    accum: int
    gpus: int


class BatchError(ValueError):
    """An impossible batch combination; the message lists valid nearby choices."""


def _fmt(train: int, micro: int, accum: int, gpus: int) -> str:
    return f"train_batch_size {train} = micro {micro} x accum {accum} x {gpus} GPU{'s' if gpus > 1 else ''}"


def divisors(n: int) -> list[int]:
    """The divisors of n in increasing order, by trial division up to sqrt(n): O(sqrt n), not O(n)."""
    small, large = [], []
    d = 1
    while d * d <= n:
        if n % d == 0:
            small.append(d)
            if d * d != n:
                large.append(n // d)
        d += 1
    return small + large[::-1]


def _suggestions(gpus: int, train: int | None, micro: int | None, accum: int | None) -> list[str]:
    """Valid combinations that change one thing from the request, nearest first."""
    out: list[str] = []
    a = accum or 1
    if train is not None:
        # Keep accumulation and GPUs, move the global batch to the nearest multiples.
        unit = a * gpus if micro is None else micro * a * gpus
        lower, upper = (train // unit) * unit, (train // unit + 1) * unit
        for t in (lower, upper):
            if t >= unit:
                out.append(_fmt(t, t // (a * gpus), a, gpus))
        # Keep the global batch and GPUs, change accumulation (micro derived).
        if train % gpus == 0:
            per_gpu = train // gpus
            accs = [d for d in divisors(per_gpu) if d != accum]
            for d in sorted(accs, key=lambda d: abs(d - a))[:2]:
                out.append(_fmt(train, per_gpu // d, d, gpus))
        # Keep the global batch and accumulation, change the number of GPUs.
        if train % a == 0:
            gs = [g for g in range(1, 9) if g != gpus and train % (a * g) == 0]
            for g in sorted(gs, key=lambda g: abs(g - gpus))[:2]:
                out.append(_fmt(train, train // (a * g), a, g))
    return out


def resolve_batch(*, gpus: int, train: int | None, micro: int | None, accum: int | None) -> BatchPlan:
    """Fill in the missing batch numbers, or raise BatchError naming valid nearby choices."""
    if gpus < 1:
        raise BatchError("gpus must be at least 1")
    if train is None:
        micro, accum = micro or 1, accum or 1
        return BatchPlan(micro * accum * gpus, micro, accum, gpus)
    if micro is not None and accum is not None:
        if micro * accum * gpus == train:
            return BatchPlan(train, micro, accum, gpus)
        problem = (
            f"train_batch_size {train} != train_micro_batch_size_per_gpu {micro} x "
            f"gradient_accumulation_steps {accum} x gpus {gpus} = {micro * accum * gpus}"
        )
    elif micro is not None:
        if train % (micro * gpus) == 0:
            return BatchPlan(train, micro, train // (micro * gpus), gpus)
        problem = f"train_batch_size {train} is not a multiple of micro {micro} x gpus {gpus} = {micro * gpus}"
    else:
        a = accum or 1
        if train % (a * gpus) == 0:
            return BatchPlan(train, train // (a * gpus), a, gpus)
        problem = (
            f"train_batch_size {train} is not divisible by gradient_accumulation_steps {a} x "
            f"gpus {gpus} = {a * gpus}, so the per-GPU micro batch would not be a whole number"
        )
    choices = _suggestions(gpus, train, micro, accum)
    hint = "; valid nearby choices: " + "; ".join(choices) if choices else ""
    raise BatchError(
        f"impossible batch: DeepSpeed needs train_batch_size = micro x accumulation x gpus; {problem}{hint}"
    )
