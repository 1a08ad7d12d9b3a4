"""Model presets: architectures built with random weights, for tests, demos, sizing and benchmarks.

Plain dicts (no torch, no transformers) so the API can size a job without loading a framework.
"""

from __future__ import annotations

from typing import Any

# deepseek-ai/deepseek-coder-1.3b-base's shape: a Llama decoder.
DEEPSEEK_1_3B: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 5504,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "vocab_size": 32256,
    "max_position_embeddings": 16384,
    "rms_norm_eps": 1e-6,
    "rope_theta": 100000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
}

# Seconds per step on a CPU core: enough to show a falling loss, small enough for tests.
TINY: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 176,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 4096,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
}

PRESETS: dict[str, dict[str, Any]] = {"tiny": TINY, "deepseek-1.3b": DEEPSEEK_1_3B}


def llama_param_count(cfg: dict[str, Any]) -> int:
    """Parameters of a Llama-shaped config (embeddings, attention, MLP, norms, head)."""
    h, i, n, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    kv = h * cfg.get("num_key_value_heads", cfg["num_attention_heads"]) // cfg["num_attention_heads"]
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * i + 2 * h
    head = 0 if cfg.get("tie_word_embeddings") else v * h
    return v * h + n * per_layer + h + head


def flops_per_token(cfg: dict[str, Any], seq_len: int) -> float:
    """Training FLOPs per token: 6N for the weights plus attention scores (PaLM's accounting)."""
    n_params = llama_param_count(cfg)
    n_embed = cfg["vocab_size"] * cfg["hidden_size"]
    attn = 12 * cfg["num_hidden_layers"] * cfg["hidden_size"] * seq_len
    return 6 * (n_params - n_embed) + attn
