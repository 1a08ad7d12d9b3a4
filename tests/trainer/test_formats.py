"""Dataset formats, loss masking, packing, the overlong policy, validation splits and bad data (no DeepSpeed)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pytest
from pydantic import ValidationError

from trainer.batch import BatchPlan
from trainer.data import (
    CONTEXT,
    IGNORE,
    PAD,
    TRAINED,
    DataOptions,
    DataStats,
    Encoder,
    PackedBatches,
    encode_examples,
    pack,
    prepare,
    split,
)
from trainer.evaluate import EvalBlocks
from trainer.formats import DEFAULT_CHAT_TEMPLATE, TemplateError, chat_segments
from trainer.paths import SpecError, inspect_data, inspect_dataset
from trainer.spec import DatasetRef, JobSpec

EOS = 0


def encode(texts: list[str]) -> list[list[int]]:
    """One token per character; '$' is EOS."""
    return [[EOS if c == "$" else ord(c) for c in t] for t in texts]


def render(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """DEFAULT_CHAT_TEMPLATE as apply_chat_template renders it, with EOS shown as '$'."""
    template = jinja2.Environment().from_string(DEFAULT_CHAT_TEMPLATE)
    return template.render(messages=messages, add_generation_prompt=add_generation_prompt, eos_token="$")


ENC = Encoder(encode, EOS, render)
CHAT = {
    "messages": [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2", "weight": 0},
    ]
}

# Data options for the cache tests: chat, no split.
CHAT_OPTS = DataOptions(
    format="chat",
    text_field="text",
    val_text_field="text",
    train_all=False,
    overlong="drop",
    seq_len=64,
    split=0.0,
    seed=1,
    tokenizer="t",
    template="x",
)


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def decoded(ids: np.ndarray, mask: np.ndarray, kind: int) -> str:
    return "".join(chr(i) if i else "$" for i, m in zip(ids, mask, strict=True) if m == kind)


@pytest.mark.parametrize(
    ("record", "declared", "expected"),
    [
        (CHAT, "auto", "chat"),
        ({"prompt": "p", "completion": "c"}, "auto", "prompt_completion"),
        ({"text": "t"}, "auto", "text"),
        ({"text": "t"}, "jsonl", "text"),  # the file format a spec could name before the formats
        ({"prompt": "p", "completion": "c", "text": "t"}, "text", "text"),
    ],
)
def test_the_format_is_detected_or_declared(
    tmp_path: Path, record: dict[str, Any], declared: str, expected: str
) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [record, record])
    info = inspect_dataset(path, DatasetRef(path="d.jsonl", format=declared))  # type: ignore[arg-type]
    assert (info.data_format, info.records) == (expected, 2)


def msgs(*messages: dict[str, Any]) -> dict[str, Any]:
    return {"messages": list(messages)}


USER = {"role": "user", "content": "hi"}
BOT = {"role": "assistant", "content": "hello"}


@pytest.mark.parametrize(
    ("bad", "fmt", "expected"),
    [
        (msgs(USER), "chat", "has no assistant message"),
        (msgs(USER, {"role": "tool", "content": "x"}, BOT), "chat", "role 'tool': only system, user and assistant"),
        (msgs(USER, {"role": "robot", "content": "x"}, BOT), "chat", "role 'robot'; roles are system, user and"),
        (msgs(USER, {"role": "assistant", "content": 3}), "chat", r"message 1 \(assistant\) has no string 'content'"),
        (msgs(USER, {"role": "assistant", "content": ""}), "chat", r"message 1 \(assistant\) has empty content"),
        (msgs(), "chat", "empty 'messages' list"),
        (msgs(USER, {**BOT, "weight": 2}), "chat", "message 1 has weight 2; a weight is 0 or 1"),
        (msgs(USER, {**BOT, "weight": True}), "chat", "message 1 has weight true; a weight is 0 or 1"),
        (msgs({**USER, "weight": 1}, BOT), "chat", "only assistant messages take one"),
        (msgs(USER, {**BOT, "tool_calls": []}), "chat", "tool_calls: tools and function calls are not supported yet"),
        ({"prompt": "p"}, "prompt_completion", "has no 'completion' field"),
        ({"prompt": "p", "completion": 1}, "prompt_completion", "field 'completion' is not a string"),
        ("[1, 2]", "chat", "is a JSON list, not an object"),
    ],
)
def test_bad_records_name_the_file_and_the_line(tmp_path: Path, bad: Any, fmt: str, expected: str) -> None:
    good = CHAT if fmt == "chat" else {"prompt": "p", "completion": "c"}
    path = write_jsonl(tmp_path / "train.jsonl", [good, good, bad])
    with pytest.raises(SpecError, match=f"dataset 'train.jsonl' line 3 .*{expected}"):
        inspect_dataset(path, DatasetRef(path="train.jsonl"))


def test_validation_data_must_be_in_the_training_format(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", [CHAT])
    write_jsonl(tmp_path / "val.jsonl", [{"prompt": "p", "completion": "c"}])
    spec = JobSpec(name="j", model="preset:tiny", dataset={"path": "train.jsonl"}, validation={"path": "val.jsonl"})
    with pytest.raises(SpecError, match="validation data is prompt_completion but the training data is chat"):
        inspect_data(spec, tmp_path)
    write_jsonl(tmp_path / "val.jsonl", [CHAT, msgs(USER)])
    with pytest.raises(SpecError, match="validation 'val.jsonl' line 2 has no assistant message"):
        inspect_data(spec, tmp_path)


def test_chat_trains_only_on_assistant_turns_with_weight_1() -> None:
    [(ids, mask)] = encode_examples([CHAT["messages"]], "chat", ENC, train_all=False)
    # Each assistant turn's content and its end (EOS, from the template) is trained; weight 0 is context.
    assert decoded(ids, mask, TRAINED) == "A1$"
    assert decoded(ids, mask, CONTEXT) == "<|system|>\nS\n<|user|>\nQ1\n<|assistant|>\n<|user|>\nQ2\n<|assistant|>\nA2$"
    assert ids[-1] == EOS and (ids == EOS).sum() == 2  # the template's EOS ends the example: none added
    [(_, mask_all)] = encode_examples([CHAT["messages"]], "chat", ENC, train_all=True)
    assert (mask_all == TRAINED).all()


def test_prompt_completion_trains_on_the_completion_and_its_eos() -> None:
    enc = Encoder(encode, EOS, prefix=(1,))  # a tokenizer that starts prompts with BOS 1
    [(ids, mask)] = encode_examples([{"prompt": "ab", "completion": "cd"}], "prompt_completion", enc, train_all=False)
    assert ids.tolist() == [1, 97, 98, 99, 100, EOS]
    assert mask.tolist() == [CONTEXT, CONTEXT, CONTEXT, TRAINED, TRAINED, TRAINED]
    [(_, mask)] = encode_examples([{"prompt": "ab", "completion": "cd"}], "prompt_completion", enc, train_all=True)
    assert mask.tolist() == [CONTEXT, TRAINED, TRAINED, TRAINED, TRAINED, TRAINED]


def test_a_template_that_is_not_prefix_stable_is_refused() -> None:
    def odd(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return f"{len(messages)}:" + "|".join(m["content"] for m in messages)

    with pytest.raises(TemplateError, match="cannot be located for loss masking"):
        chat_segments(CHAT["messages"], odd)


def example(n: int, trained_from: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.arange(1, n + 1, dtype=np.uint32)
    ids[-1] = EOS
    mask = np.array([CONTEXT] * trained_from + [TRAINED] * (n - trained_from), dtype=np.uint8)
    return ids, mask


def test_packing_keeps_examples_whole_with_their_labels() -> None:
    stats = DataStats("chat")
    tokens, mask = pack([example(4, 2), example(3, 1), example(5, 2)], 8, stats, stream=False, pad_id=EOS)
    blocks, masks = tokens.reshape(-1, 8), mask.reshape(-1, 8)
    # 4 + 3 fit in one block (1 pad); 5 starts the next (3 pads); EOS ends each example.
    assert blocks.tolist() == [[1, 2, 3, 0, 1, 2, 0, 0], [1, 2, 3, 4, 0, 0, 0, 0]]
    assert masks.tolist() == [[1, 1, 2, 2, 1, 2, 2, 0], [1, 1, 2, 2, 2, 0, 0, 0]]
    assert (stats.examples, stats.blocks, stats.tokens, stats.dropped) == (3, 2, 12, 0)
    assert stats.trained_tokens == 7  # targets: the first position of a block is never predicted


def test_text_is_a_stream_cut_anywhere_and_fully_trained() -> None:
    stats = DataStats("text")
    examples = encode_examples(["abc", "de"], "text", Encoder(encode, EOS), train_all=True)
    tokens, mask = pack(examples, 2, stats, stream=True)
    assert tokens.tolist() == [97, 98, 99, EOS, 100, 101]  # the last EOS is cut off with the tail
    assert (mask == TRAINED).all() and stats.blocks == 3


@pytest.mark.parametrize(("policy", "kept", "counted"), [("drop", [3], "dropped"), ("truncate", [4, 3], "truncated")])
def test_overlong_examples_are_dropped_or_truncated_and_counted(policy: str, kept: list[int], counted: str) -> None:
    stats = DataStats("prompt_completion")
    tokens, mask = pack([example(9, 2), example(3, 1)], 4, stats, stream=False, overlong=policy, pad_id=EOS)
    lengths = [int(np.count_nonzero(row)) for row in mask.reshape(-1, 4)]
    assert lengths == kept and getattr(stats, counted) == 1 and stats.examples == len(kept)


def test_labels_ignore_context_and_padding_and_the_step_knows_its_trained_tokens() -> None:
    tokens, mask = pack([example(4, 2)] * 8, 4, DataStats("chat"), stream=False, pad_id=EOS)
    plan = BatchPlan(train=4, micro=1, accum=2, gpus=2)
    b = PackedBatches(tokens, 4, plan, 0, seed=1, mask=mask)
    assert b.micro_labels(0, 0).tolist() == [[IGNORE, IGNORE, 3, EOS]]
    assert b.micro_batch(0, 0).tolist() == [[1, 2, 3, EOS]]
    assert b.step_tokens(0) == (16, 8)  # 4 blocks x 4 real tokens, 2 targets each
    text = PackedBatches(tokens, 4, plan, 0, seed=1)
    assert np.array_equal(text.micro_labels(0, 0), text.micro_batch(0, 0)) and text.step_tokens(0) == (16, 12)


def test_the_validation_split_depends_on_the_seed_alone() -> None:
    items = list(range(100))
    train, val = split(items, 0.1, seed=3)
    assert len(val) == 10 and sorted(train + val) == items and not set(train) & set(val)
    assert split(items, 0.1, seed=3) == (train, val) and split(items, 0.1, seed=4)[1] != val
    assert split(items, 0.0, seed=3) == (items, []) and len(split(items[:3], 0.01, seed=3)[1]) == 1


def test_every_validation_block_is_evaluated_once_with_equal_passes_per_rank() -> None:
    tokens, mask = pack([example(4, 2)] * 5, 4, DataStats("chat"), stream=False, pad_id=EOS)
    seen = []
    per_rank = []
    for rank in (0, 1):
        batches = EvalBlocks(tokens, mask, 4, micro=2, rank=rank, world=2).micro_batches()
        per_rank.append(len(batches))
        for _, labels in batches:
            seen += [row for row in labels.tolist() if any(x != IGNORE for x in row)]
    assert per_rank == [2, 2] and len(seen) == 5


def test_prepared_data_is_cached_and_split_by_the_seed(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [CHAT] * 20)
    info = inspect_dataset(path, DatasetRef(path="d.jsonl"))
    opts = dataclasses.replace(CHAT_OPTS, split=0.25)
    data = prepare(info, None, opts, ENC, tmp_path / "cache", build=True)
    assert data.stats["train"]["records"] == 15 and data.stats["validation"]["records"] == 5
    assert data.stats["validation"]["source"] == "split" and data.val is not None
    files = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("*.npy")}
    again = prepare(info, None, opts, ENC, tmp_path / "cache", build=True)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("*.npy")} == files  # not rebuilt
    assert np.array_equal(again.train[0], data.train[0]) and data.built and not again.built
    prepare(info, None, DataOptions(**{**opts.__dict__, "train_all": True}), ENC, tmp_path / "cache", build=True)
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2  # masking options are part of the key


def test_preset_tokenizers_get_the_default_template_which_the_saved_tokenizer_keeps(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from trainer import model as models
    from trainer.paths import ModelSource

    tok = models.load_tokenizer(ModelSource("preset", "tiny"))
    enc = models.encoder(tok, "chat")
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE and enc.prefix == ()
    tok.save_pretrained(tmp_path)
    saved = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    prompt = saved.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>\nhi\n<|assistant|>\n"
    [(ids, mask)] = encode_examples([CHAT["messages"]], "chat", enc, train_all=False)
    assert tok.decode(ids[mask == TRAINED]) == "A1<|endoftext|>"


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"validation": {"path": "v.jsonl"}, "validation_split": 0.1}, "not both"),
        ({"keep_best": True}, "keep_best needs validation data"),
        ({"eval_every": 5}, "eval_every needs validation data"),
        ({"validation_split": 0.6}, "less than or equal to 0.5"),
        ({"dataset": {"path": "d", "train_on": "prompts"}}, "'completions' or 'all'"),
        ({"dataset": {"path": "d", "overlong": "split"}}, "'drop' or 'truncate'"),
    ],
)
def test_spec_validation_options(extra: dict[str, Any], expected: str) -> None:
    with pytest.raises(ValidationError, match=expected):
        JobSpec.model_validate({"name": "j", "model": "preset:tiny", "dataset": {"path": "d"}, **extra})
    assert PAD == 0


def test_the_cache_key_follows_the_content_not_the_path(tmp_path: Path) -> None:
    from trainer.data import cache_key

    opts = CHAT_OPTS
    a = inspect_dataset(write_jsonl(tmp_path / "a.jsonl", [CHAT]), DatasetRef(path="a.jsonl"))
    b = inspect_dataset(write_jsonl(tmp_path / "b.jsonl", [CHAT]), DatasetRef(path="b.jsonl"))
    assert cache_key(a, None, opts) == cache_key(b, None, opts)
    write_jsonl(tmp_path / "b.jsonl", [CHAT, CHAT])
    assert cache_key(a, None, opts) != cache_key(b, None, opts)
    assert cache_key(a, None, opts) != cache_key(a, None, DataOptions(**{**opts.__dict__, "seq_len": 128}))


def test_the_cache_evicts_least_recently_used_entries_beyond_its_bound(tmp_path: Path) -> None:
    import os
    import time

    from trainer.tokencache import evict

    now = time.time()
    for key, age in (("old", 9000), ("older", 9999), ("recent", 60), ("mine", 9999)):
        for part in ("train.npy", "train-mask.npy", "json"):
            f = tmp_path / f"data-{key}.{part}"
            f.write_bytes(b"x" * 100)
            os.utime(f, (now - age, now - age))
    stale = tmp_path / "data-dead.train.tmp123.npy"
    stale.write_bytes(b"x")
    os.utime(stale, (now - 2 * 86400, now - 2 * 86400))
    # 1200 bytes held, 650 allowed: the least recently used go first; the entry in use ("mine") and
    # one used in the last 10 minutes (another job may be opening it) stay.
    assert evict(tmp_path, 650, keep="mine") == ["older", "old"]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(f"data-{k}.{p}" for k in ("recent", "mine") for p in ("train.npy", "train-mask.npy", "json"))


def test_the_token_cache_is_shared_under_the_data_root_unless_turned_off(tmp_path: Path) -> None:
    from trainer.tokencache import location

    shared = tmp_path / "data/.cache/tokens"
    assert location(tmp_path / "data", tmp_path / "run", 10**9) == (shared, 10**9)
    assert location(tmp_path / "data", tmp_path / "run", 0) == (tmp_path / "run/data", None)
