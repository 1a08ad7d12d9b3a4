"""JobSpec validation: what a person pasting a config gets told, before anything is queued."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from trainer.batch import BatchError, resolve_batch
from trainer.spec import JobSpec, describe_errors

ARTICLE_DS = {
    "train_batch_size": 32,
    "gradient_accumulation_steps": 4,
    "fp16": {"enabled": True},
    "optimizer": {"type": "AdamW", "params": {"lr": 5e-5, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01}},
    "zero_optimization": {"stage": 2},
}


def spec(**kw: Any) -> dict[str, Any]:
    return {"name": "job", "model": "preset:tiny", "dataset": {"path": "corpus.jsonl"}, **kw}


def error_of(data: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as e:
        JobSpec.model_validate(data)
    return describe_errors(e.value)


def test_article_config_on_three_gpus_names_the_valid_choices() -> None:
    msg = error_of(spec(gpus=3, deepspeed=ARTICLE_DS))
    assert "train_batch_size 32 is not divisible by gradient_accumulation_steps 4 x gpus 3 = 12" in msg
    # The nearest valid choices, one change at a time: batch size, accumulation, GPU count.
    assert "train_batch_size 24 = micro 2 x accum 4 x 3 GPUs" in msg
    assert "train_batch_size 36 = micro 3 x accum 4 x 3 GPUs" in msg
    assert "train_batch_size 32 = micro 4 x accum 4 x 2 GPUs" in msg


def test_article_config_on_two_gpus_is_valid_with_micro_4() -> None:
    s = JobSpec.model_validate(spec(gpus=2, deepspeed=ARTICLE_DS))
    assert (s.batch.train, s.batch.micro, s.batch.accum, s.batch.gpus) == (32, 4, 4, 2)
    assert s.deepspeed.precision == "fp16"


@pytest.mark.parametrize(
    ("gpus", "given", "expected"),
    [
        (2, {"train": 32, "micro": 4}, (32, 4, 4)),
        (3, {"micro": 2, "accum": 5}, (30, 2, 5)),
        (4, {"train": 64}, (64, 16, 1)),
        (1, {}, (1, 1, 1)),
        (3, {"train": 24, "micro": 2, "accum": 4}, (24, 2, 4)),
    ],
)
def test_any_two_batch_numbers_derive_the_third(gpus: int, given: dict[str, int], expected: tuple[int, ...]) -> None:
    args = {"train": None, "micro": None, "accum": None} | given
    plan = resolve_batch(gpus=gpus, **args)
    assert (plan.train, plan.micro, plan.accum) == expected
    assert plan.train == plan.micro * plan.accum * gpus


def test_three_inconsistent_batch_numbers_are_refused() -> None:
    with pytest.raises(BatchError, match=r"32 != .* 4 x gradient_accumulation_steps 4 x gpus 3 = 48"):
        resolve_batch(gpus=3, train=32, micro=4, accum=4)


def test_auto_batch_values_are_derived() -> None:
    s = JobSpec.model_validate(spec(gpus=2, deepspeed={"train_batch_size": 16, "train_micro_batch_size_per_gpu": "auto",
                                                        "gradient_accumulation_steps": 2}))
    assert s.batch.micro == 4


def test_unknown_top_level_field_is_rejected() -> None:
    msg = error_of(spec(learning_rate=1e-4))
    assert "learning_rate: Extra inputs are not permitted" in msg


def test_unknown_deepspeed_key_lists_the_allowed_ones() -> None:
    msg = error_of(spec(deepspeed={"train_batch_size": 8, "zero_optimisation": {"stage": 2}}))
    assert "unknown DeepSpeed key 'zero_optimisation'" in msg and "zero_optimization" in msg


@pytest.mark.parametrize(
    "key", ["tensorboard", "wandb", "csv_monitor", "flops_profiler", "autotuning", "checkpoint", "aio"]
)
def test_deepspeed_keys_that_write_files_or_load_code_are_refused(key: str) -> None:
    msg = error_of(spec(deepspeed={key: {"enabled": True, "output_path": "/tmp/x"}}))
    assert f"DeepSpeed key {key!r} is refused" in msg


def test_nvme_offload_is_refused() -> None:
    offload = {"device": "nvme", "nvme_path": "/"}
    msg = error_of(spec(deepspeed={"zero_optimization": {"stage": 3, "offload_param": offload}}))
    assert "NVMe offload is refused" in msg


def test_unknown_key_inside_a_deepspeed_block_is_rejected() -> None:
    msg = error_of(spec(deepspeed={"optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "foo": 1}}}))
    assert "deepspeed.optimizer.params.foo" in msg


def test_fp16_and_bf16_together_are_refused() -> None:
    assert "fp16 and bf16 cannot both be enabled" in error_of(
        spec(deepspeed={"fp16": {"enabled": True}, "bf16": {"enabled": True}})
    )


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/etc/passwd", "must be relative to its configured root"),
        ("../secrets.jsonl", "must not contain '..'"),
        ("data/../../x.jsonl", "must not contain '..'"),
        ("a\x00b", "without NUL bytes"),
        ("~/x.jsonl", "must be relative"),
    ],
)
def test_dataset_paths_cannot_leave_the_root(path: str, expected: str) -> None:
    assert expected in error_of(spec(dataset={"path": path}))


def test_model_paths_cannot_leave_the_root() -> None:
    assert "must be relative" in error_of(spec(model="/models/llama"))
    assert "must not contain '..'" in error_of(spec(model="../llama"))


def test_unknown_preset_lists_presets() -> None:
    msg = error_of(spec(model="preset:huge"))
    assert "preset:tiny" in msg and "preset:deepseek-1.3b" in msg


def test_dataset_needs_exactly_one_of_path_or_id() -> None:
    assert "exactly one of 'path'" in error_of(spec(dataset={"text_field": "text"}))
    assert "exactly one of 'path'" in error_of(spec(dataset={"path": "a.jsonl", "id": "abc"}))


def test_no_field_can_carry_code_or_environment() -> None:
    assert "trust_remote_code: Extra inputs are not permitted" in error_of(spec(trust_remote_code=True))
    assert "env: Extra inputs" in error_of(spec(env={"LD_PRELOAD": "/x.so"}))
    assert "launcher_args: Extra inputs" in error_of(spec(launcher_args=["--hostfile", "/etc/x"]))


def test_ranges_are_enforced() -> None:
    assert "gpus" in error_of(spec(gpus=0))
    assert "seq_len" in error_of(spec(seq_len=10**6))
    assert "priority" in error_of(spec(priority=1000))
    assert "deepspeed.zero_optimization.stage" in error_of(spec(deepspeed={"zero_optimization": {"stage": 4}}))
