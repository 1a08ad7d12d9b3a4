"""A rough per-GPU memory estimate for a spec: model states under ZeRO, activations, overhead.

Good to a few GB, which is what "will it fit on a 24 GB card" needs; the real number comes from the
run's `gpu_mem_gb`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainer.presets import PRESETS, llama_param_count
from trainer.spec import JobSpec

GB = 1024**3
OVERHEAD_GB = 1.0  # CUDA context, NCCL buffers, allocator slack
_LLAMA_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def model_config(spec: JobSpec, source_kind: str, source_name: str) -> dict[str, Any] | None:
    """The architecture config of the spec's model when it can be read without loading weights."""
    if source_kind == "preset":
        return PRESETS[source_name]
    path: Path | None = None
    if source_kind == "local":
        path = Path(source_name) / "config.json"
    elif source_kind == "hub":
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source_name, "config.json")
        path = Path(cached) if isinstance(cached, str) else None
    if path is None or not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) and all(isinstance(cfg.get(k), int) for k in _LLAMA_KEYS) else None


def model_state_bytes_per_param(spec: JobSpec, precision: str) -> dict[str, float]:
    """Bytes per parameter on one GPU for weights, gradients and optimizer states under the ZeRO stage."""
    g = spec.gpus
    zero = spec.deepspeed.zero_optimization
    half = precision in ("fp16", "bf16")
    weights, grads = (2.0, 2.0) if half else (4.0, 4.0)
    optim = 12.0 if half else 8.0  # fp32 master copy (mixed precision) + Adam's two moments
    stage = zero.stage
    if stage >= 1:
        optim /= g
    if stage >= 2:
        grads /= g
    if stage >= 3:
        weights /= g
    if zero.offload_optimizer is not None and zero.offload_optimizer.device == "cpu" and stage >= 1:
        optim = 0.0
    if zero.offload_param is not None and zero.offload_param.device == "cpu" and stage >= 3:
        weights = 0.0
    return {"weights": weights, "gradients": grads, "optimizer": optim}


def estimate_memory(spec: JobSpec, cfg: dict[str, Any] | None, precision: str) -> dict[str, Any]:
    """{"per_gpu_gb", "breakdown_gb", "notes"}; per_gpu_gb is None when the model's size is unknown."""
    if cfg is None:
        return {
            "per_gpu_gb": None,
            "breakdown_gb": {},
            "notes": ["model size unknown: no readable config.json"],
        }
    n = llama_param_count(cfg)
    per_param = model_state_bytes_per_param(spec, precision)
    breakdown = {k: n * v / GB for k, v in per_param.items()}
    h, layers, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    micro, seq = spec.batch.micro, spec.seq_len
    act_bytes = 1 if precision in ("fp16", "bf16") else 2  # multiplier on the 16-bit formula
    # Per layer ~34 * s * b * h bytes in 16-bit with fused (SDPA) attention (Korthikanti et al.);
    # with checkpointing only each layer's input (2 * s * b * h) is kept, plus one layer recomputed.
    per_layer = 34 * seq * micro * h * act_bytes
    kept_per_layer = 2 * seq * micro * h * act_bytes if spec.gradient_checkpointing else per_layer
    acts = layers * kept_per_layer + (per_layer if spec.gradient_checkpointing else 0)
    breakdown["activations"] = acts / GB
    breakdown["logits"] = micro * seq * vocab * (2 + 4 + 4) / GB  # 16-bit logits, fp32 upcast, its grad
    breakdown["overhead"] = OVERHEAD_GB
    notes = [f"{n / 1e9:.2f}B parameters, ZeRO stage {spec.deepspeed.zero_optimization.stage}, {precision}"]
    return {
        "per_gpu_gb": round(sum(breakdown.values()), 2),
        "breakdown_gb": {k: round(v, 3) for k, v in breakdown.items()},
        "notes": notes,
        "n_params": n,
    }
