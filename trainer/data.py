"""Training data: read texts, tokenize once, pack into seq_len blocks, hand each rank its share.

Packing (documents joined with EOS, cut into full blocks) means every position trains on a real
token: no padding compute, and tokens/s counts only real tokens. The order of blocks is a pure
function of (seed, epoch, step), so a resumed run sees exactly the batches the uninterrupted run
would have seen, on every rank, without saving any sampler state.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trainer.batch import BatchPlan
from trainer.datastats import held_out
from trainer.formats import Format, Render, Segments, TemplateError, record_text, segments
from trainer.paths import DatasetInfo, SpecError
from trainer.tokencache import evict

EncodeBatch = Callable[[list[str]], list[list[int]]]
CHUNK = 2048  # texts per tokenizer call: large enough for the fast tokenizer's parallelism

# One byte per token says what it is: padding (no input, no label), context (input only: prompts,
# user turns, role tags) or trained (its label is itself: the loss is computed on predicting it).
PAD, CONTEXT, TRAINED = 0, 1, 2
IGNORE = -100  # the label of a position the loss skips (PyTorch's cross_entropy ignore_index)


@dataclass
class Encoder:
    """What tokenizing needs from a tokenizer: batch encode, EOS, the chat template, BOS for prompts."""

    encode: EncodeBatch
    eos_id: int
    render: Render | None = None
    prefix: tuple[int, ...] = ()  # what the tokenizer puts before a prompt at inference (BOS), if anything


@dataclass
class DataStats:
    """What preparing one data set found, for the start event and POST /jobs/validate."""

    format: str
    records: int = 0
    examples: int = 0  # records that made it into the blocks
    dropped: int = 0  # longer than seq_len, overlong=drop
    truncated: int = 0  # longer than seq_len, overlong=truncate
    tokens: int = 0  # real (non-pad) tokens in the blocks
    trained_tokens: int = 0  # of which trained on
    blocks: int = 0


def read_items(info: DatasetInfo, text_field: str) -> Iterator[Any]:
    """Each record as `formats.segments` takes it: a text, a prompt and completion, or messages."""
    with info.path.open(encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                yield record_text(json.loads(line) if info.format == "jsonl" else line, info.data_format, text_field)


def split(items: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """(train, held out): `held_out(records, fraction)` records, chosen by the seed alone."""
    n_val = held_out(len(items), fraction)
    if n_val == 0:
        return items, []
    held = np.zeros(len(items), dtype=bool)
    held[np.random.default_rng([seed, 0x5A11]).permutation(len(items))[:n_val]] = True
    return [x for x, h in zip(items, held, strict=True) if not h], [x for x, h in zip(items, held, strict=True) if h]


def encode_examples(
    items: Iterable[Any], fmt: Format, enc: Encoder, *, train_all: bool
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(tokens, mask) per example, each ending with EOS. Pieces are tokenized separately, as a prompt is
    at inference (the answer follows the prompt's own tokens); EOS is trained when the example's end is."""
    chunk: list[Segments] = []

    def flush() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        flat = [text for segs in chunk for text, _ in segs]
        encoded = iter(enc.encode(flat)) if flat else iter(())
        for segs in chunk:
            ids: list[int] = list(enc.prefix) if fmt == "prompt_completion" else []
            mask: list[int] = [CONTEXT] * len(ids)
            for (_, trained), piece in zip(segs, encoded, strict=False):
                ids += piece
                mask += [TRAINED if trained else CONTEXT] * len(piece)
            if not ids or ids[-1] != enc.eos_id:  # a template may end the turn with EOS itself
                ids.append(enc.eos_id)
                mask.append(TRAINED if (segs and segs[-1][1]) else CONTEXT)
            yield np.asarray(ids, dtype=np.uint32), np.asarray(mask, dtype=np.uint8)
        chunk.clear()

    for item in items:
        chunk.append([(t, tr) for t, tr in segments(item, fmt, train_all=train_all, render=enc.render) if t])
        if len(chunk) >= CHUNK:
            yield from flush()
    if chunk:
        yield from flush()


def pack(
    examples: Iterable[tuple[np.ndarray, np.ndarray]],
    seq_len: int,
    stats: DataStats,
    *,
    stream: bool,
    overlong: str = "drop",
    pad_id: int = 0,
    pad_tail: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Examples into blocks of seq_len tokens, each example keeping its mask.

    stream (text): documents are joined and cut anywhere, so every position is a real token (the tail
    is dropped, or padded with `pad_tail`). Otherwise (chat, prompt_completion) an example is never
    cut: it goes whole into the current block or starts a new one, the rest of the block is padding
    (input EOS, no label); an example longer than seq_len is dropped or truncated (`overlong`)."""
    toks: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    used = 0  # tokens in the current block (not stream)
    for ids, mask in examples:
        if not stream and len(ids) > seq_len:
            if overlong == "drop":
                stats.dropped += 1
                continue
            ids, mask = ids[:seq_len], mask[:seq_len]
            stats.truncated += 1
        if not stream and used + len(ids) > seq_len:
            toks.append(np.full(seq_len - used, pad_id, dtype=np.uint32))
            masks.append(np.zeros(seq_len - used, dtype=np.uint8))
            used = 0
        toks.append(ids)
        masks.append(mask)
        used += len(ids)
        stats.examples += 1
    tokens = np.concatenate(toks) if toks else np.zeros(0, dtype=np.uint32)
    mask = np.concatenate(masks) if masks else np.zeros(0, dtype=np.uint8)
    rest = len(tokens) % seq_len
    if rest and (pad_tail or not stream):
        tokens = np.concatenate([tokens, np.full(seq_len - rest, pad_id, dtype=np.uint32)])
        mask = np.concatenate([mask, np.zeros(seq_len - rest, dtype=np.uint8)])
    elif rest:
        tokens, mask = tokens[: len(tokens) - rest], mask[: len(mask) - rest]
    stats.blocks = len(tokens) // seq_len
    stats.tokens = int(np.count_nonzero(mask))
    stats.trained_tokens = int(np.count_nonzero(mask.reshape(-1, seq_len)[:, 1:] == TRAINED)) if len(mask) else 0
    return tokens, mask


@dataclass(frozen=True)
class DataOptions:
    """Everything the prepared blocks depend on besides the files' contents: part of the cache key."""

    format: Format
    text_field: str
    val_text_field: str
    train_all: bool
    overlong: str
    seq_len: int
    split: float
    seed: int
    tokenizer: str
    template: str


@dataclass
class Prepared:
    train: tuple[np.ndarray, np.ndarray]  # tokens, mask (memory-mapped)
    val: tuple[np.ndarray, np.ndarray] | None
    stats: dict[str, Any]
    built: bool = False  # this call tokenized (else the cache had it)


def content_hash(path: Path) -> str:
    """sha256 of a file's bytes: the same data under another name or path shares a cache entry."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _identity(info: DatasetInfo) -> str:
    return f"{content_hash(info.path)}|{info.format}"


def cache_key(train: DatasetInfo, val: DatasetInfo | None, opts: DataOptions) -> str:
    """The files' contents and every option that changes the blocks (tokenizer, template, masking, seq_len, split)."""
    raw = json.dumps([_identity(train), _identity(val) if val else None, asdict(opts)], sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def prepare(
    train: DatasetInfo,
    val: DatasetInfo | None,
    opts: DataOptions,
    enc: Encoder,
    cache_dir: Path,
    *,
    build: bool,
    key: str | None = None,
    max_bytes: int | None = None,
) -> Prepared:
    """Tokenize and pack once into cache_dir (`build`: rank 0; the others read what it wrote).

    Files are written under temporary names and renamed; the stats file, renamed last, marks a
    complete entry, so a resumed run or another job on the same data reuses it, a crash mid-way
    leaves nothing half-read, and two jobs building one entry at once write the same bytes (the last
    rename wins). `max_bytes`: the builder then evicts least recently used entries beyond it."""
    key = key or cache_key(train, val, opts)
    try:
        data = _prepare(train, val, opts, enc, cache_dir, build=build, key=key)
    except TemplateError as e:  # the job's data cannot be masked with this tokenizer: `invalid`
        raise SpecError(str(e), "dataset") from None
    if build:
        with contextlib.suppress(OSError):  # another job evicted it meanwhile: this job has it open
            os.utime(cache_dir / f"data-{key}.json")
        if max_bytes is not None:
            evict(cache_dir, max_bytes, keep=key)
    return data


def _prepare(
    train: DatasetInfo,
    val: DatasetInfo | None,
    opts: DataOptions,
    enc: Encoder,
    cache_dir: Path,
    *,
    build: bool,
    key: str,
) -> Prepared:
    base = cache_dir / f"data-{key}"
    names = {part: Path(f"{base}.{part}.npy") for part in ("train", "train-mask", "val", "val-mask")}
    stats_file = Path(f"{base}.json")
    built = build and not stats_file.exists()
    if built:
        cache_dir.mkdir(parents=True, exist_ok=True)
        items = list(read_items(train, opts.text_field))
        stats_t = DataStats(opts.format, records=len(items))
        if val is not None:
            held = list(read_items(val, opts.val_text_field))
        else:
            items, held = split(items, opts.split, opts.seed)
            stats_t.records = len(items)

        def packed(part: str, records: list[Any], into: DataStats, pad_tail: bool) -> dict[str, np.ndarray]:
            examples = encode_examples(records, opts.format, enc, train_all=opts.train_all)
            blocks, masks = pack(
                examples,
                opts.seq_len,
                into,
                stream=opts.format == "text",
                overlong=opts.overlong,
                pad_id=enc.eos_id,
                pad_tail=pad_tail,
            )
            return {part: blocks, f"{part}-mask": masks}

        arrays = packed("train", items, stats_t, pad_tail=False)
        stats: dict[str, Any] = {"train": asdict(stats_t), "validation": None}
        if held:
            stats_v = DataStats(opts.format, records=len(held))
            arrays |= packed("val", held, stats_v, pad_tail=True)
            stats["validation"] = asdict(stats_v) | {"source": "file" if val is not None else "split"}
        for part, arr in arrays.items():
            tmp = names[part].with_suffix(f".tmp{os.getpid()}.npy")
            np.save(tmp, arr)
            os.replace(tmp, names[part])
        tmp_stats = stats_file.with_suffix(f".tmp{os.getpid()}")
        tmp_stats.write_text(json.dumps(stats))
        os.replace(tmp_stats, stats_file)
    stats = json.loads(stats_file.read_text())

    def load(part: str) -> np.ndarray:
        return np.load(names[part], mmap_mode="r")

    has_val = stats["validation"] is not None
    val = (load("val"), load("val-mask")) if has_val else None
    return Prepared((load("train"), load("train-mask")), val, stats, built)


@dataclass
class PackedBatches:
    """Deterministic global batches of packed blocks; rank r takes its slice of each micro-step.

    `mask` (one byte per token: PAD, CONTEXT, TRAINED) gives the labels; without it every token is trained."""

    tokens: np.ndarray
    seq_len: int
    plan: BatchPlan
    rank: int
    seed: int
    mask: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.n_blocks = len(self.tokens) // self.seq_len
        self.steps_per_epoch = self.n_blocks // self.plan.train
        if self.steps_per_epoch == 0:
            raise SpecError(
                f"dataset too small: {len(self.tokens)} tokens make {self.n_blocks} blocks of seq_len "
                f"{self.seq_len}, and one optimizer step needs train_batch_size = {self.plan.train} blocks",
                "dataset",
            )
        self._order_epoch = -1
        self._order = np.zeros(0, dtype=np.int64)

    def _order_for(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.n_blocks)
            self._order_epoch = epoch
        return self._order

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def _blocks(self, step: int, first: int, count: int) -> np.ndarray:
        order = self._order_for(self.epoch_of(step))
        base = (step % self.steps_per_epoch) * self.plan.train + first
        return order[base : base + count]

    def _rows(self, array: np.ndarray, blocks: np.ndarray) -> np.ndarray:
        return np.stack([array[b * self.seq_len : (b + 1) * self.seq_len] for b in blocks])

    def _mine(self, step: int, micro_step: int) -> np.ndarray:
        p = self.plan
        return self._blocks(step, micro_step * p.gpus * p.micro + self.rank * p.micro, p.micro)

    def micro_batch(self, step: int, micro_step: int) -> np.ndarray:
        """Token ids [micro, seq_len] for this rank at optimizer step `step`, micro-step `micro_step`."""
        return self._rows(self.tokens, self._mine(step, micro_step)).astype(np.int64)

    def micro_labels(self, step: int, micro_step: int) -> np.ndarray:
        """Labels [micro, seq_len] for the same blocks: the token where it is trained, else IGNORE."""
        ids = self.micro_batch(step, micro_step)
        if self.mask is None:
            return ids
        return np.where(self._rows(self.mask, self._mine(step, micro_step)) == TRAINED, ids, IGNORE)

    def step_tokens(self, step: int) -> tuple[int, int]:
        """(real tokens, trained targets) of the whole global batch of `step`, all ranks together: every
        rank knows them without communication, so each can weight its loss by the global count."""
        blocks = self._blocks(step, 0, self.plan.train)
        if self.mask is None:
            return len(blocks) * self.seq_len, len(blocks) * (self.seq_len - 1)
        rows = self._rows(self.mask, blocks)
        return int(np.count_nonzero(rows)), int(np.count_nonzero(rows[:, 1:] == TRAINED))
