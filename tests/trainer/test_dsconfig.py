"""DeepSpeed's own parsers as the oracle: every config a spec resolves to, DeepSpeed accepts too.

Specs are drawn from the JobSpec's JSON schema (the OpenAPI document's), with each bound's edge
values drawn often: what trainbox accepts must never be refused by DeepSpeed after the job waited
in the queue (or, worse, silently mean something else).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from deepspeed.runtime import lr_schedules
from deepspeed.runtime.config import DeepSpeedConfig as DeepSpeedParser
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from trainer.dsconfig import build_ds_config, optimizer_summary, resolve_precision
from trainer.spec import DeepSpeedConfig, JobSpec

SCHEMA = DeepSpeedConfig.model_json_schema()


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    return SCHEMA["$defs"][ref.rsplit("/", 1)[1]] if ref else node


def _edges(lo: float, hi: float, kind: type) -> list[Any]:
    out = [lo, hi, kind((lo + hi) / 2) if kind is float else (lo + hi) // 2, kind(1), kind(0)]
    if kind is int:
        out += [lo + 1, hi - 1]
    return [v for v in out if lo <= v <= hi]


def strategy(node: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values valid for this JSON schema node, edge values weighted in."""
    node = _resolve(node)
    if "anyOf" in node:
        return st.one_of(*(strategy(n) for n in node["anyOf"]))
    if "const" in node:
        return st.just(node["const"])
    if "enum" in node:
        return st.sampled_from(node["enum"])
    kind = node.get("type")
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        lo = node.get("minimum", node.get("exclusiveMinimum", -(2**31) - 1) + 1)
        hi = node.get("maximum", node.get("exclusiveMaximum", 2**31 + 1) - 1)
        return st.one_of(st.sampled_from(_edges(lo, hi, int)), st.integers(lo, hi))
    if kind == "number":
        lo = node.get("minimum", node.get("exclusiveMinimum", -1e9))
        hi = node.get("maximum", node.get("exclusiveMaximum", 1e9))
        open_lo, open_hi = "exclusiveMinimum" in node, "exclusiveMaximum" in node
        floats = st.floats(lo, hi, exclude_min=open_lo, exclude_max=open_hi, allow_nan=False)
        edges = [v for v in _edges(lo, hi, float) if not (open_lo and v == lo) and not (open_hi and v == hi)]
        edges += [math.nextafter(lo, math.inf)] if open_lo else []
        return st.one_of(st.sampled_from(edges), floats)
    if kind == "array" and "prefixItems" in node:
        return st.tuples(*(strategy(n) for n in node["prefixItems"])).map(list)
    if kind == "object":
        props = node.get("properties", {})
        required = set(node.get("required", []))
        return st.fixed_dictionaries(
            {k: strategy(v) for k, v in props.items() if k in required},
            optional={k: strategy(v) for k, v in props.items() if k not in required},
        )
    raise AssertionError(f"no strategy for schema node {node}")


def deepspeed_accepts(cfg: dict[str, Any], spec: JobSpec) -> None:
    """Raise if DeepSpeed would refuse this config: its config parser, its scheduler, torch's AdamW."""
    # This process is one rank: DeepSpeed checks the batch product against world size 1.
    one_rank = {**cfg, "train_batch_size": cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"]}
    DeepSpeedParser(one_rank)
    opt = optimizer_summary(spec)
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW(
        [param], lr=opt["lr"], betas=tuple(opt["betas"]), eps=opt["eps"], weight_decay=opt["weight_decay"]
    )
    if "scheduler" in cfg:
        getattr(lr_schedules, cfg["scheduler"]["type"])(optimizer, **cfg["scheduler"]["params"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(ds=strategy(SCHEMA), gpus=st.integers(1, 8), steps=st.integers(1, 10**6), on_gpu=st.booleans())
def test_every_config_trainbox_accepts_deepspeed_accepts(ds: dict[str, Any], gpus: int, steps: int, on_gpu: bool):
    try:
        spec = JobSpec.model_validate(
            {"name": "j", "model": "preset:tiny", "dataset": {"path": "d.jsonl"}, "gpus": gpus, "deepspeed": ds}
        )
    except ValidationError:
        return  # refused at submission: nothing reaches DeepSpeed
    precision, _ = resolve_precision(spec, on_gpu=on_gpu)
    deepspeed_accepts(build_ds_config(spec, precision=precision, steps=steps), spec)


def _spec(**ds: Any) -> dict[str, Any]:
    return {"name": "j", "model": "preset:tiny", "dataset": {"path": "d.jsonl"}, "deepspeed": ds}


@pytest.mark.parametrize(
    "ds",
    [
        {"zero_optimization": {"stage": 2, "reduce_bucket_size": 0}},
        {"zero_optimization": {"stage": 2, "reduce_bucket_size": -5}},
        {"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": -1}},
        {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": -1}},
        {"zero_optimization": {"stage": 2, "allgather_bucket_size": -1}},
        {"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": -10}}},
        {"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 0}}},
        {"scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": -0.1}}},
        {"scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": -1}}},
        {"gradient_clipping": -1},
        {"fp16": {"enabled": True, "min_loss_scale": 0.5}},
        {"fp16": {"enabled": True, "loss_scale_window": 0}},
        {"optimizer": {"type": "AdamW", "params": {"lr": -1e-4}}},
    ],
)
def test_values_deepspeed_refuses_or_ignores_are_refused_at_submission(ds: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        JobSpec.model_validate(_spec(**ds))


def test_the_oracle_itself_refuses_what_deepspeed_refuses() -> None:
    """Without trainbox's checks these configs fail only inside DeepSpeed, after the queue."""
    base = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": 1}
    with pytest.raises(Exception, match="reduce_bucket_size"):
        DeepSpeedParser({**base, "zero_optimization": {"stage": 2, "reduce_bucket_size": 0}})
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    with pytest.raises(ValueError, match="warmup_num_steps"):
        lr_schedules.WarmupLR(optimizer, warmup_num_steps=-10)


def test_auto_bucket_sizes_resolve_to_deepspeed_defaults() -> None:
    spec = JobSpec.model_validate(
        _spec(
            train_batch_size=4,
            zero_optimization={"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto"},
        )
    )
    cfg = build_ds_config(spec, precision="bf16", steps=10)
    assert "auto" not in cfg["zero_optimization"].values() and cfg["zero_optimization"]["stage"] == 3
    deepspeed_accepts(cfg, spec)
