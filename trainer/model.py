"""Models and tokenizers: presets with random weights, local directories, the local hub cache.

Everything loads offline and without remote code: `local_files_only=True`, `trust_remote_code=False`.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from trainer.data import Encoder
from trainer.formats import DEFAULT_CHAT_TEMPLATE
from trainer.paths import ModelSource, SpecError
from trainer.presets import PRESETS

TOKENIZER_FILE = Path(__file__).parent / "assets" / "tokenizer.json"
EOS = "<|endoftext|>"


def load_tokenizer(source: ModelSource) -> Any:
    """The model's own tokenizer, or for presets the byte-level BPE shipped in trainer/assets."""
    if source.kind == "preset":
        return PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER_FILE), eos_token=EOS, pad_token=EOS, bos_token=None)
    tok = AutoTokenizer.from_pretrained(source.name, local_files_only=True, trust_remote_code=False)
    if tok.eos_token_id is None:
        raise SpecError(f"the tokenizer of {source.name!r} has no EOS token to separate documents", "model")
    return tok


def tokenizer_id(source: ModelSource, tokenizer: Any) -> str:
    return f"{source.kind}:{source.name}:{len(tokenizer)}"


def model_config(source: ModelSource) -> Any:
    if source.kind == "preset":
        cfg = dict(PRESETS[source.name])
        return AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    return AutoConfig.from_pretrained(source.name, local_files_only=True, trust_remote_code=False)


def build_model(source: ModelSource, *, ds_config: dict[str, Any], gradient_checkpointing: bool) -> Any:
    """The causal LM in fp32 (DeepSpeed casts to fp16/bf16), SDPA attention, ZeRO-3 aware."""
    zero3 = ds_config["zero_optimization"]["stage"] == 3
    keep: Any = None
    if zero3:
        # While this object lives, transformers builds and loads the model partitioned across ranks
        # (deepspeed.zero.Init): a model larger than one GPU never materialises whole on one.
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig(ds_config)
    config = model_config(source)
    config.use_cache = False
    with nullcontext(keep):
        if source.kind == "preset":
            model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                source.name,
                config=config,
                local_files_only=True,
                trust_remote_code=False,
                attn_implementation="sdpa",
                dtype=torch.float32,
            )
    model._trainbox_ds_config = keep  # keep the ZeRO-3 hook alive as long as the model
    if gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: norms and biases keep their scale (the usual AdamW practice)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        shape = getattr(p, "ds_shape", p.shape)  # ZeRO-3 leaves p itself empty
        (decay if len(shape) >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def count_params(model: torch.nn.Module) -> int:
    """Parameters, also when ZeRO-3 has partitioned them (ds_numel is the full size)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def encoder(tokenizer: Any, data_format: str) -> Encoder:
    """Tokenizing for a data format. Chat data is rendered with the tokenizer's own chat template; one
    without a template gets DEFAULT_CHAT_TEMPLATE, set on the tokenizer so the exported model keeps it."""
    render = None
    if data_format == "chat":
        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE

        def render(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
            return str(
                tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
            )

    eos = tokenizer.eos_token_id
    prefix = tuple(i for i in tokenizer("", add_special_tokens=True)["input_ids"] if i != eos)  # BOS, if added
    return Encoder(
        encode=lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"],
        eos_id=eos,
        render=render,
        prefix=prefix,
    )


def template_id(tokenizer: Any) -> str:
    """The chat template's text, for the data cache key (a different template renders other tokens)."""
    return str(getattr(tokenizer, "chat_template", None) or "")
