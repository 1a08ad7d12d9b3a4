"""A per-GPU memory estimate for a spec: model states under ZeRO, activations, logits, overhead.

Built term by term from what DeepSpeed and Hugging Face's Llama keep at the peak; on the H200 check
(docs/BENCHMARKS.md section 8) it came within 3% of the measured peak (`torch.cuda.max_memory_allocated`)
at micro batches 2 to 16, with and without checkpointing. The run's `gpu_mem_gb` is the real number.
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
    states = {k: n * v / GB for k, v in per_param.items()}
    plan, stage = spec.batch, spec.deepspeed.zero_optimization.stage
    h, i, layers, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    kv_share = cfg.get("num_key_value_heads", cfg["num_attention_heads"]) / cfg["num_attention_heads"]
    half = precision in ("fp16", "bf16")
    width = 1 if half else 2  # fp32 training doubles the 16-bit tensors below
    tokens = plan.micro * spec.seq_len
    # Bytes one layer of Hugging Face's Llama (SDPA attention) keeps per token for backward, in 16-bit:
    # two RMSNorms (fp32 input 4h, 16-bit output 2h each), attention's rotated q, k and v, its output and
    # o_proj's contiguous input (6h + 4h * kv_share), the SwiGLU MLP's gate, up, activation and product (8i).
    per_layer = ((18 + 4 * kv_share) * h + 8 * i) * width * tokens
    # With checkpointing each layer keeps only its input (2h), and one layer is recomputed at a time.
    acts = layers * 2 * h * width * tokens + per_layer if spec.gradient_checkpointing else layers * per_layer
    # The loss's backward: every activation, and the logits (16-bit logits 2 bytes, log-softmax's fp32
    # output 4 and the fp32 gradients into and out of it 4 + 4; fp32 logits need no upcast copy).
    backward = states | {"activations": acts / GB, "logits": tokens * vocab * (14 if half else 12) / GB}
    if stage >= 2 and plan.accum == 1:
        # Without accumulation ZeRO-2 makes each gradient during backward, as activations are freed:
        # at this peak there are none yet (measured on the H200 check, docs/BENCHMARKS.md section 8).
        backward["gradients"] = 0.0
    # The optimizer step, activations freed: beside the states, the 16-bit gradients and the fp32 copy of
    # the partition the optimizer updates (DeepSpeed's ZeRO-1/2 step; none with fp32 or an offloaded one).
    fp32_grads = 4.0 / (spec.gpus if stage >= 1 else 1) if half and per_param["optimizer"] else 0.0
    step = states | {"gradients": n * (per_param["gradients"] + fp32_grads) / GB, "activations": 0.0, "logits": 0.0}
    at_step = sum(step.values()) > sum(backward.values())
    breakdown = (step if at_step else backward) | {"overhead": OVERHEAD_GB}
    notes = [f"{n / 1e9:.2f}B parameters, ZeRO stage {stage}, {precision}"]
    if at_step:
        notes.append("the peak is the optimizer step (gradients in 16-bit and fp32 beside its states)")
    return {
        "per_gpu_gb": round(sum(breakdown.values()), 2),
        "breakdown_gb": {k: round(v, 3) for k, v in breakdown.items()},
        "notes": notes,
        "n_params": n,
    }
