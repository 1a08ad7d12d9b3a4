"""What the validate dry run reports about a job's data, estimated from its first records without a
tokenizer: how many records, about how many tokens, the share of them trained on, how many examples
are longer than seq_len, and the held-out split.

Tokens are estimated from bytes (BYTES_PER_TOKEN, a rate typical of BPE vocabularies on English text
and code); chat records are rendered with the default chat template (trainer.formats). The trainer
counts exactly when it tokenizes (its `start` event), so these figures are for planning only.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from jinja2.sandbox import ImmutableSandboxedEnvironment

from trainer.formats import DEFAULT_CHAT_TEMPLATE, Format, record_text, segments
from trainer.paths import DatasetInfo

BYTES_PER_TOKEN = 4
SAMPLE_RECORDS = 200
# Files up to this size are counted line by line (well under a second); larger ones are estimated
# from the sample's bytes per record.
COUNT_BYTES_LIMIT = 256 << 20

_TEMPLATE = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(DEFAULT_CHAT_TEMPLATE)


def _render(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return _TEMPLATE.render(messages=messages, add_generation_prompt=add_generation_prompt, eos_token="</s>")


def held_out(records: int, fraction: float) -> int:
    """How many of `records` a validation_split of `fraction` holds out: round(fraction x records), at
    least one, and never all of them (trainer.data.split holds out exactly these many)."""
    if fraction <= 0 or records < 2:
        return 0
    return min(records - 1, max(1, round(fraction * records)))


@dataclass(frozen=True)
class DataEstimate:
    data_format: Format
    records: int
    records_counted: bool  # False: estimated from the first records' bytes per record
    estimated_tokens: int
    trained_share: float  # of those tokens, the share that is trained on (the rest is context, label -100)
    overlong: int  # examples longer than seq_len (estimated); what happens to them is `overlong_policy`
    overlong_policy: str  # dropped | truncated | packed (text is packed into seq_len blocks: nothing is lost)


def _count_records(info: DatasetInfo) -> int:
    with info.path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def data_stats(
    info: DatasetInfo, *, text_field: str, seq_len: int, train_all: bool, overlong: str, sample: int = SAMPLE_RECORDS
) -> DataEstimate:
    """Stats of a checked dataset (`trainer.paths.inspect_dataset`), from its first `sample` records."""
    fmt = info.data_format
    tokens = trained = long = sampled = sample_bytes = 0
    with info.path.open("rb") as f:
        for raw in f:
            line = raw.strip()
            if not line:
                continue
            if sampled >= sample:
                break
            sampled += 1
            sample_bytes += len(raw)
            item = record_text(json.loads(line) if info.format == "jsonl" else line.decode(), fmt, text_field)
            pieces = segments(item, fmt, train_all=train_all, render=_render if fmt == "chat" else None)
            sizes = [(math.ceil(len(text.encode()) / BYTES_PER_TOKEN), on) for text, on in pieces]
            n = sum(s for s, _ in sizes) + 1  # EOS ends every example
            tokens += n
            trained += sum(s for s, on in sizes if on) + (1 if pieces and pieces[-1][1] else 0)
            long += n > seq_len
    counted = info.bytes <= COUNT_BYTES_LIMIT
    records = _count_records(info) if counted else max(sampled, round(info.bytes / max(1, sample_bytes / sampled)))
    scale = records / max(1, sampled)
    return DataEstimate(
        data_format=fmt,
        records=records,
        records_counted=counted,
        estimated_tokens=round(tokens * scale),
        trained_share=round(trained / tokens, 4) if tokens else 0.0,
        overlong=0 if fmt == "text" else round(long * scale),
        overlong_policy="packed" if fmt == "text" else ("dropped" if overlong == "drop" else "truncated"),
    )
