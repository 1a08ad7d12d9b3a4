"""Build trainer/assets/tokenizer.json, the offline tokenizer that model presets use.

A byte-level BPE (any UTF-8 text encodes, nothing is unknown) with 4096 entries, trained on the
Python standard library's source: English prose in docstrings plus code, and it lies on every
machine with Python. Run once; the result is committed so training never needs a network.
    python scripts/build_tokenizer.py
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

EOS = "<|endoftext|>"
VOCAB = 4096
OUT = Path(__file__).resolve().parent.parent / "trainer" / "assets" / "tokenizer.json"


def corpus() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py"))[:400]
    return [p.read_text(encoding="utf-8", errors="ignore") for p in files]


def main() -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(OUT))
    print(f"wrote {OUT} ({tok.get_vocab_size()} tokens)")


if __name__ == "__main__":
    main()
