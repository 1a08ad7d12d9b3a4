"""Packing and sharding: no padding, EOS between documents, disjoint ranks, a reproducible order."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from trainer.batch import BatchPlan
from trainer.data import Encoder, PackedBatches, encode_examples, read_items
from trainer.paths import SpecError, inspect_dataset
from trainer.spec import DatasetRef

EOS = 0


def tokenize(texts, encode, eos_id) -> np.ndarray:
    """All texts as one token stream, each document followed by EOS so the model learns to stop."""
    pieces = [ids for ids, _ in encode_examples(texts, "text", Encoder(encode, eos_id), train_all=True)]
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint32)


def encode(texts: list[str]) -> list[list[int]]:
    return [[ord(c) for c in t] for t in texts]


def test_texts_are_joined_with_eos_and_nothing_is_dropped() -> None:
    tokens = tokenize(iter(["ab", "c"]), encode, EOS)
    assert tokens.tolist() == [97, 98, EOS, 99, EOS]


def test_jsonl_and_plain_text_are_read(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "hello"}) + "\n\n" + json.dumps({"body": "world"}) + "\n")
    (tmp_path / "b.txt").write_text("line one\n\nline two\n")
    info = inspect_dataset(tmp_path / "a.jsonl", DatasetRef(path="a.jsonl", text_field="body"))
    assert info.format == "jsonl" and info.records == 2
    assert list(read_items(info, "body")) == ["hello", "world"]
    info = inspect_dataset(tmp_path / "b.txt", DatasetRef(path="b.txt"))
    assert info.format == "text" and list(read_items(info, "text")) == ["line one", "line two"]


@pytest.mark.parametrize(
    ("content", "field", "expected"),
    [
        ('{"text": "a"}\n{"body": "b"}\n', "text", "line 2 has no text field 'text'"),
        ('{"text": "a"}\n{"text": \n', "text", "line 2 is not valid JSON"),
        ('{"text": 3}\n', "text", "field 'text' is not a string"),
        ("\n\n  \n", "text", "dataset is empty"),
    ],
)
def test_unusable_data_is_a_clear_error(tmp_path: Path, content: str, field: str, expected: str) -> None:
    (tmp_path / "d.jsonl").write_text(content)
    with pytest.raises(SpecError, match=expected):
        inspect_dataset(tmp_path / "d.jsonl", DatasetRef(path="d.jsonl", text_field=field, format="jsonl"))


def test_non_utf8_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "d.txt").write_bytes(b"ok\n\xff\xfe bad\n")
    with pytest.raises(SpecError, match="line 2 is not UTF-8"):
        inspect_dataset(tmp_path / "d.txt", DatasetRef(path="d.txt"))


def batches(rank: int, seed: int = 1, n_tokens: int = 1000) -> PackedBatches:
    plan = BatchPlan(train=8, micro=2, accum=2, gpus=2)
    return PackedBatches(np.arange(n_tokens, dtype=np.uint32), 10, plan, rank, seed)


def test_ranks_get_disjoint_full_blocks_that_cover_the_global_batch() -> None:
    b0, b1 = batches(0), batches(1)
    assert b0.n_blocks == 100 and b0.steps_per_epoch == 12
    for step in (0, 5, 11, 12, 30):
        seen = [tuple(row) for b in (b0, b1) for m in range(2) for row in b.micro_batch(step, m)]
        assert len(seen) == 8 and len(set(seen)) == 8  # 8 distinct blocks per optimizer step
        for row in seen:
            assert row[0] % 10 == 0 and list(row) == list(range(row[0], row[0] + 10))  # whole, unpadded blocks


def test_each_epoch_visits_distinct_blocks_in_a_new_order() -> None:
    b = batches(0)
    epoch0 = [tuple(b.micro_batch(s, 0)[0]) for s in range(12)]
    epoch1 = [tuple(b.micro_batch(s, 0)[0]) for s in range(12, 24)]
    assert len(set(epoch0)) == 12 and epoch0 != epoch1


def test_order_depends_only_on_seed_and_step() -> None:
    fresh, resumed = batches(1), batches(1)
    for s in range(20):
        fresh.micro_batch(s, 1)
    assert np.array_equal(fresh.micro_batch(20, 1), resumed.micro_batch(20, 1))
    assert not np.array_equal(batches(1, seed=2).micro_batch(0, 0), resumed.micro_batch(0, 0))


def test_too_small_dataset_says_how_small() -> None:
    with pytest.raises(SpecError, match=r"50 tokens make 5 blocks of seq_len 10.*needs train_batch_size = 8"):
        batches(0, n_tokens=50)
