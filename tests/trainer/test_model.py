"""Models and configs: presets have the right shape; local directories load with from_pretrained."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from trainer.dsconfig import build_ds_config, resolve_precision
from trainer.model import build_model, load_tokenizer, param_groups
from trainer.paths import ModelSource, resolve_model
from trainer.presets import DEEPSEEK_1_3B, flops_per_token, llama_param_count
from trainer.spec import JobSpec


def test_deepseek_preset_has_the_1_3b_shape() -> None:
    with torch.device("meta"):
        model = build_model(
            ModelSource("preset", "deepseek-1.3b"),
            ds_config={"zero_optimization": {"stage": 0}},
            gradient_checkpointing=False,
        )
    cfg = model.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.vocab_size) == (
        2048,
        5504,
        24,
        16,
        32256,
    )
    n = sum(p.numel() for p in model.parameters())
    assert n == llama_param_count(DEEPSEEK_1_3B)
    assert 1.3e9 < n < 1.4e9
    assert model.config._attn_implementation == "sdpa"
    # 6N (non-embedding) + attention at seq 2048: about 8.5 GFLOPs per token.
    assert 8.0e9 < flops_per_token(DEEPSEEK_1_3B, 2048) < 9.0e9


def test_local_directory_round_trip_with_from_pretrained(tmp_path: Path) -> None:
    source = ModelSource("preset", "tiny")
    model = build_model(source, ds_config={"zero_optimization": {"stage": 0}}, gradient_checkpointing=False)
    tok = load_tokenizer(source)
    save_dir = tmp_path / "models" / "tiny-llama"
    model.save_pretrained(save_dir)
    tok.save_pretrained(save_dir)

    loaded_source = resolve_model("tiny-llama", tmp_path / "models")
    assert loaded_source.kind == "local"
    loaded = build_model(loaded_source, ds_config={"zero_optimization": {"stage": 0}}, gradient_checkpointing=True)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert loaded.is_activation_checkpointing
    loaded_tok = load_tokenizer(loaded_source)
    text = "def train(model):\n    return model"
    assert loaded_tok.decode(loaded_tok(text)["input_ids"]) == text
    assert loaded_tok.eos_token_id == tok.eos_token_id
    again = AutoModelForCausalLM.from_pretrained(save_dir, local_files_only=True)
    assert again.config.vocab_size == 4096


def test_weight_decay_skips_norms_and_biases() -> None:
    model = build_model(
        ModelSource("preset", "tiny"), ds_config={"zero_optimization": {"stage": 0}}, gradient_checkpointing=False
    )
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_shipped_tokenizer_round_trips_any_text() -> None:
    tok = load_tokenizer(ModelSource("preset", "tiny"))
    for text in ["plain words", "ünïcödé ✓ 漢字", "x = {'a': [1, 2]}\n\ttab"]:
        assert tok.decode(tok(text)["input_ids"]) == text
    assert len(tok) == 4096


def spec(**ds: object) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "j",
            "model": "preset:tiny",
            "dataset": {"path": "c.jsonl"},
            "gpus": 2,
            "deepspeed": {"train_batch_size": 16, "gradient_accumulation_steps": 2, **ds},
        }
    )


def test_resolved_deepspeed_config_fills_batches_precision_and_scheduler() -> None:
    s = spec(
        fp16={"enabled": True, "initial_scale_power": 12},
        scheduler={"type": "WarmupDecayLR"},
        optimizer={"type": "AdamW", "params": {"lr": 1e-4}},
    )
    cfg = build_ds_config(s, precision="fp16", steps=500)
    batch = (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"])
    assert batch == (16, 4, 2)
    assert cfg["fp16"] == {"enabled": True, "initial_scale_power": 12}
    assert cfg["scheduler"]["params"] == {
        "warmup_min_lr": 0.0,
        "warmup_max_lr": 1e-4,
        "warmup_num_steps": 50,
        "warmup_type": "linear",
        "total_num_steps": 500,
    }
    assert "optimizer" not in cfg and cfg["gradient_clipping"] == 1.0
    assert cfg["zero_optimization"] == {"stage": 0}


def test_fp16_on_cpu_becomes_bf16_with_a_note() -> None:
    s = spec(fp16={"enabled": True})
    assert resolve_precision(s, on_gpu=True) == ("fp16", [])
    precision, notes = resolve_precision(s, on_gpu=False)
    assert precision == "bf16" and "running bf16 instead" in notes[0]
    cfg = build_ds_config(s, precision=precision, steps=10)
    assert cfg["bf16"] == {"enabled": True} and "fp16" not in cfg
