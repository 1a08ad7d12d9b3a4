"""The DeepSpeed config a job actually runs with, resolved from its spec and the box.

No torch here: `POST /jobs/validate` shows this config before anything is queued.
"""

from __future__ import annotations

from typing import Any, Literal

from trainer.spec import JobSpec

Precision = Literal["fp16", "bf16", "fp32"]


def resolve_precision(spec: JobSpec, *, on_gpu: bool, bf16_supported: bool = True) -> tuple[Precision, list[str]]:
    """The precision that will run, and notes for people when it differs from what was asked."""
    asked = spec.deepspeed.precision
    notes: list[str] = []
    if asked == "fp16" and not on_gpu:
        # The CPU backend has no fp16 kernels for training; bf16 keeps the memory saving and the
        # mixed-precision code path (master weights in fp32), without loss scaling.
        ran: Precision = "bf16" if bf16_supported else "fp32"
        notes.append(f"fp16 was requested but CPU ranks cannot train in fp16; running {ran} instead")
        return ran, notes
    if asked == "bf16" and not bf16_supported:
        notes.append("bf16 was requested but this device does not support it; running fp32 instead")
        return "fp32", notes
    return asked, notes


def total_steps(spec: JobSpec, steps_per_epoch: int) -> int:
    """max_steps when given (epochs are then as many as it takes), else epochs x steps per epoch."""
    return spec.max_steps if spec.max_steps is not None else spec.epochs * steps_per_epoch


def build_ds_config(spec: JobSpec, *, precision: Precision, steps: int) -> dict[str, Any]:
    """A complete DeepSpeed config: the user's keys plus batch sizes, precision and scheduler filled in."""
    ds = spec.deepspeed
    plan = spec.batch
    cfg: dict[str, Any] = ds.model_dump(
        exclude_unset=True, exclude_none=True, exclude={"optimizer", "fp16", "bf16", "scheduler"}
    )
    cfg.update(
        train_batch_size=plan.train,
        train_micro_batch_size_per_gpu=plan.micro,
        gradient_accumulation_steps=plan.accum,
        gradient_clipping=1.0 if ds.gradient_clipping == "auto" else ds.gradient_clipping,
        steps_per_print=ds.steps_per_print,
        # The trainer builds the optimizer (torch AdamW, fused on GPU): DeepSpeed's ZeRO wrappers
        # take any torch optimizer, and a fused torch AdamW needs no JIT-compiled extension.
        zero_allow_untested_optimizer=True,
    )
    zero = ds.zero_optimization.model_dump(exclude_unset=True, exclude_none=True)
    # "auto" (Hugging Face's spelling) is for a trainer to fill in; DeepSpeed drops such keys and uses
    # its defaults, so the resolved config leaves them out and shows what will run.
    cfg["zero_optimization"] = {k: v for k, v in zero.items() if v != "auto"} | {"stage": ds.zero_optimization.stage}
    if precision == "fp16":
        cfg["fp16"] = (ds.fp16.model_dump(exclude_unset=True) if ds.fp16 else {}) | {"enabled": True}
    elif precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    if ds.scheduler is not None:
        p = ds.scheduler.params
        lr = ds.optimizer.params.lr
        warmup = p.warmup_num_steps if p.warmup_num_steps != "auto" else max(1, min(100, steps // 10))
        params: dict[str, Any] = {
            "warmup_min_lr": 0.0 if p.warmup_min_lr == "auto" else p.warmup_min_lr,
            "warmup_max_lr": lr if p.warmup_max_lr == "auto" else p.warmup_max_lr,
            "warmup_num_steps": warmup,
            "warmup_type": p.warmup_type,
        }
        if ds.scheduler.type in ("WarmupDecayLR", "WarmupCosineLR"):
            params["total_num_steps"] = steps if p.total_num_steps == "auto" else p.total_num_steps
        if ds.scheduler.type == "WarmupCosineLR":
            # WarmupCosineLR takes ratios of the optimizer's lr rather than absolute rates.
            params = {
                "total_num_steps": params["total_num_steps"],
                "warmup_num_steps": warmup,
                "warmup_type": p.warmup_type,
                "warmup_min_ratio": p.warmup_min_ratio if p.warmup_min_ratio is not None else 0.0,
                "cos_min_ratio": p.cos_min_ratio if p.cos_min_ratio is not None else 0.0001,
            }
        cfg["scheduler"] = {"type": ds.scheduler.type, "params": params}
    return cfg


def optimizer_summary(spec: JobSpec) -> dict[str, Any]:
    """The optimizer as it will be built, for the start event and the validate endpoint."""
    opt = spec.deepspeed.optimizer
    p = opt.params
    return {
        "type": "AdamW" if opt.type.lower() == "adamw" or p.adam_w_mode is not False else "Adam",
        "lr": p.lr,
        "betas": list(p.betas),
        "eps": p.eps,
        "weight_decay": p.weight_decay,
    }
