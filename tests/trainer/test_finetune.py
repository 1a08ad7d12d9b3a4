"""Fine-tuning on 2 CPU ranks (gloo, real DeepSpeed): the loss mask, a chat fine-tune judged by a
validation split, keep_best, and an exported model that chats with its saved template."""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.trainer.conftest import events, tiny_spec

pytestmark = pytest.mark.slow

NAMES = ["ann", "bob", "cid", "dan", "eve", "fay", "gus", "hal", "ivy", "jon", "kim", "lou", "max", "ned"]
ANSWER = " the quick brown fox"


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("train_on", ["completions", "all"])
def test_the_mask_decides_what_is_learned(
    train_on: str, data_root: Path, tmp_path: Path, run_trainer: Callable[..., tuple[int, Path]]
) -> None:
    """Prompts of 10 random 3-letter strings, each followed by the same answer. Trained on completions
    only, the loss is the answer's, which is fixed: it must fall below 0.05. Trained on everything, the
    loss includes the prompts: 30 uniform draws from 20 letters carry 30 ln 20 = 90 nats per record,
    more than 2 nats per trained token, which no model can predict, so it must stay above 1.5."""
    rng = random.Random(0)
    letters = "bcdfghjklmnpqrstvwxz"

    def prompt() -> str:
        return " ".join("".join(rng.choice(letters) for _ in range(3)) for _ in range(10)) + " ->"

    write_jsonl(data_root / "masking.jsonl", [{"prompt": prompt(), "completion": ANSWER} for _ in range(400)])
    spec = tiny_spec(
        dataset={"path": "masking.jsonl", "train_on": train_on},
        seq_len=128,
        max_steps=50,
        checkpoint_every=0,
        deepspeed={"train_batch_size": 8, "gradient_accumulation_steps": 1},
    )
    if train_on == "completions":
        # keep_best, judged by prompts whose answer is another one: the eval loss falls while the model
        # learns the shape of an answer, then rises as it learns this answer; the best is in between.
        other = [{"prompt": prompt(), "completion": " a lazy dog sleeps"} for _ in range(40)]
        write_jsonl(data_root / "other.jsonl", other)
        spec |= {"validation": {"path": "other.jsonl"}, "eval_every": 5, "keep_best": True}
    code, run_dir = run_trainer(spec, tmp_path)
    assert code == 0, (run_dir / "train.log").read_text()[-3000:]
    evs = events(run_dir)
    data = evs[0]["data"]["train"]
    assert data["format"] == "prompt_completion" and data["examples"] == 400 and data["dropped"] == 0
    steps = [e for e in evs if e["type"] == "step"]
    last = steps[-1]
    if train_on == "completions":
        assert last["loss"] < 0.05, [e["loss"] for e in steps]
        # Only the answers are trained: a small share of the tokens processed (10 prompt strings each).
        assert last["trained_tokens"] < 0.4 * last["tokens"]
        assert_best_exported(run_dir, evs)
    else:
        assert min(e["loss"] for e in steps[-5:]) > 1.5, [e["loss"] for e in steps]
        assert last["trained_tokens"] > 0.9 * last["tokens"]
    for e in steps:
        assert 0 < e["trained_tokens_per_s"] <= e["tokens_per_s"]
        assert e["tokens_per_s"] < e["samples_per_s"] * 128  # padding between examples is not counted


def assert_best_exported(run_dir: Path, evs: list[dict[str, Any]]) -> None:
    """The exported model is the lowest-eval-loss checkpoint: its loss on the validation blocks (as the
    trainer packed them) is that evaluation's, not the last one's."""
    evals = {e["step"]: e["eval_loss"] for e in evs if e["type"] == "eval"}
    best = min(evals, key=evals.__getitem__)
    assert list(evals) == list(range(5, 55, 5)) and best < 50 and evals[50] > evals[best] + 1, evals
    assert evs[-1]["model_step"] == best and (run_dir / "checkpoints" / f"step-{best}").is_dir()
    cache = evs[0]["data"]["cache"]  # the shared token cache under the data root
    ids = torch.from_numpy(np.load(f"{cache}.val.npy").astype(np.int64)).view(-1, 128)
    mask = torch.from_numpy(np.load(f"{cache}.val-mask.npy")).view(-1, 128)
    labels = torch.where(mask == 2, ids, -100)
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model", local_files_only=True)
    with torch.no_grad():
        logits = model(ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    assert loss.item() == pytest.approx(evals[best], abs=1e-3)


@pytest.fixture(scope="module")
def pretrained(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A preset pretrained briefly on corpus A (conftest's corpus), saved in HF format under the model root."""
    import subprocess
    import sys

    from tests.trainer.conftest import REPO, trainer_cmd

    run_dir = data_root / f"pretrain-{tmp_path_factory.mktemp('p').name}"
    run_dir.mkdir()
    (run_dir / "spec.json").write_text(json.dumps(tiny_spec(max_steps=15, checkpoint_every=0)))
    # The other trainer runs' environment (tests/trainer/conftest.py): the shared op cache and the venv's
    # ninja. A bare PATH and no TORCH_EXTENSIONS_DIR compiled the op again into ~/.cache (about 30 s).
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"} | {"CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        trainer_cmd(run_dir / "spec.json", run_dir, data_root),
        cwd=REPO,
        env=env,
        timeout=300,
        capture_output=True,
        executable=None,
    )
    assert proc.returncode == 0, (run_dir / "train.log").read_text()[-3000:] + proc.stderr.decode()[-2000:]
    assert sys.executable
    return f"{run_dir.name}/model"


def chat(name: str, reply: bool = True) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Greet {name} please."}]
    return messages + ([{"role": "assistant", "content": f"Hello {name},{ANSWER} says hi."}] if reply else [])


def test_chat_fine_tune_of_a_saved_model_with_a_validation_split(
    pretrained: str, data_root: Path, tmp_path: Path, run_trainer: Callable[..., tuple[int, Path]]
) -> None:
    rng = random.Random(1)
    write_jsonl(data_root / "chat.jsonl", [{"messages": chat(rng.choice(NAMES))} for _ in range(300)])
    spec = tiny_spec(
        model=pretrained,
        dataset={"path": "chat.jsonl"},
        validation_split=0.1,
        eval_every=10,
        keep_best=True,
        max_steps=40,
        checkpoint_every=0,
        keep_checkpoints=1,
    )
    code, run_dir = run_trainer(spec, tmp_path)
    assert code == 0, (run_dir / "train.log").read_text()[-3000:]
    evs = events(run_dir)
    data = evs[0]["data"]
    assert data["train"]["format"] == "chat" and (data["train"]["records"], data["validation"]["records"]) == (270, 30)
    assert data["validation"]["source"] == "split" and evs[0]["eval_every"] == 10

    evals = [e for e in evs if e["type"] == "eval"]
    assert [e["step"] for e in evals] == [10, 20, 30, 40]
    for e in evals:
        assert e["perplexity"] == pytest.approx(math.exp(e["eval_loss"]), rel=1e-4)
        assert e["tokens"] == data["validation"]["trained_tokens"]  # every validation token, both ranks
    losses = [e["eval_loss"] for e in evals]
    assert losses[-1] < 0.6 * losses[0], losses

    best = min(evals, key=lambda e: e["eval_loss"])["step"]
    assert evs[-1]["status"] == "succeeded" and evs[-1]["model_step"] == best
    assert json.loads((run_dir / "checkpoints" / "best.json").read_text())["step"] == best
    assert (run_dir / "checkpoints" / f"step-{best}").is_dir()

    model = AutoModelForCausalLM.from_pretrained(run_dir / "model", local_files_only=True)
    tok = AutoTokenizer.from_pretrained(run_dir / "model", local_files_only=True)
    assert tok.chat_template  # the default template travelled with the model
    ids = tok.apply_chat_template(
        chat("eve", reply=False), add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id)
    reply = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert reply.startswith("Hello"), reply
