"""Device facts: dense peak FLOP/s for MFU, and NVML (the GPUs, without importing torch)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

# Dense (no sparsity) peak bf16/fp16 tensor FLOP/s with fp32 accumulation, per GPU.
PEAK_FLOPS: list[tuple[str, float]] = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("RTX 4090", 165.2e12),
    ("RTX 3090", 71e12),
    ("A6000", 155e12),
    ("V100", 125e12),
]


def peak_flops(device_name: str) -> float | None:
    """The GPU's dense half-precision peak; TRAINBOX_PEAK_TFLOPS overrides it for unknown cards."""
    override = os.environ.get("TRAINBOX_PEAK_TFLOPS")
    if override:
        return float(override) * 1e12
    for key, flops in PEAK_FLOPS:
        if key.lower() in device_name.lower():
            return flops
    return None


@contextlib.contextmanager
def nvml() -> Iterator[Any | None]:
    """NVML, initialized for the block and shut down after it; None where there is none (no driver, no
    library: a CPU box). The one place the worker and the launcher open it."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        yield None
        return
    try:
        yield pynvml
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
