"""JobSpec validation: what a person pasting a config gets told, before anything is queued."""

from __future__ import annotations

import math
from typing import Any

import pytest
from pydantic import ValidationError

from trainer.batch import BatchError, divisors, resolve_batch
from trainer.spec import (
    MAX_MICRO_BATCH,
    MAX_RUNTIME_S,
    MAX_SEED,
    MAX_STEPS,
    MAX_TRAIN_BATCH,
    MODEL_DIR_PATTERN,
    NAME_PATTERN,
    PATH_PATTERN,
    JobSpec,
    check_relative_path,
    describe_errors,
)

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
    s = JobSpec.model_validate(
        spec(
            gpus=2,
            deepspeed={
                "train_batch_size": 16,
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": 2,
            },
        )
    )
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


# --- hardening: bounds, numbers, names ------------------------------------------------------------


@pytest.mark.timeout(10)
def test_batch_suggestions_do_bounded_work() -> None:
    """The nearest-choices search tried every divisor candidate: seconds of CPU for one spec."""
    with pytest.raises(BatchError, match="valid nearby choices"):
        resolve_batch(gpus=1, train=10**11 + 1, micro=None, accum=2)
    assert divisors(36) == [1, 2, 3, 4, 6, 9, 12, 18, 36] and divisors(1) == [1] and divisors(49) == [1, 7, 49]


def test_batch_fields_have_upper_bounds_defined_once() -> None:
    msg = error_of(spec(deepspeed={"train_batch_size": 200000001, "gradient_accumulation_steps": 2}))
    assert f"less than or equal to {MAX_TRAIN_BATCH}" in msg
    assert "gradient_accumulation_steps" in error_of(spec(deepspeed={"gradient_accumulation_steps": 10**12}))
    assert "train_micro_batch_size_per_gpu" in error_of(spec(deepspeed={"train_micro_batch_size_per_gpu": 10**5}))
    # Derived values are held to the same limits.
    msg = error_of(spec(deepspeed={"train_batch_size": MAX_TRAIN_BATCH}))
    assert f"train_micro_batch_size_per_gpu {MAX_TRAIN_BATCH}, over the limit of {MAX_MICRO_BATCH}" in msg


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_steps", 10**30),
        ("max_steps", 2**31),
        ("checkpoint_every", 2**31),
        ("epochs", 10**6),
        ("seed", 2**31),
        ("priority", 10**12),
        ("max_runtime_s", 2**31),
        ("seq_len", 10**6),
        ("keep_checkpoints", 10**9),
    ],
)
def test_integers_fit_their_database_columns(field: str, value: int) -> None:
    """max_steps 10**30 was accepted; then every metric insert failed (steps are 32-bit INTEGER)."""
    assert field in error_of(spec(**{field: value}))
    assert MAX_STEPS < 2**31 and MAX_SEED < 2**31 and MAX_RUNTIME_S < 2**31


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan, 10**400])
def test_every_number_in_the_spec_is_finite(bad: float) -> None:
    """Infinity and NaN parse from JSON in Python; they were accepted and stored as invalid JSON."""
    for path in _number_fields(JobSpec.model_json_schema()):
        body: dict[str, Any] = spec(deepspeed={})
        node = body
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = bad
        with pytest.raises(ValidationError) as e:
            JobSpec.model_validate(body)
        assert ".".join(path) in describe_errors(e.value), path


def _number_fields(schema: dict[str, Any]) -> list[tuple[str, ...]]:
    """Paths to every number field of the spec (betas are two numbers in a list: both are checked)."""
    out: list[tuple[str, ...]] = []

    def walk(node: dict[str, Any], path: tuple[str, ...]) -> None:
        if "$ref" in node:
            node = schema["$defs"][node["$ref"].rsplit("/", 1)[1]]
        for alt in node.get("anyOf", []):
            walk(alt, path)
        if node.get("type") == "number":
            out.append(path)
        for key, sub in node.get("properties", {}).items():
            walk(sub, (*path, key))

    walk(schema, ())
    assert ("deepspeed", "gradient_clipping") in out and len(out) > 10, out
    return sorted(set(out))


@pytest.mark.parametrize(("field", "value"), [("gpus", True), ("seed", "42"), ("seq_len", 64.5), ("epochs", False)])
def test_integers_are_json_integers(field: str, value: Any) -> None:
    """`true` and "42" are not integers (lax coercion took them); 64.0 is one, as JSON Schema says."""
    assert field in error_of(spec(**{field: value}))
    assert JobSpec.model_validate(spec(seq_len=64.0)).seq_len == 64


def test_booleans_are_json_booleans() -> None:
    assert "gradient_checkpointing" in error_of(spec(gradient_checkpointing="yes"))
    assert "deepspeed.fp16.enabled" in error_of(spec(deepspeed={"fp16": {"enabled": 1}}))


@pytest.mark.parametrize("name", ["evil\n", "evil\r\n", "x" * 100 + "\n", "a\nb", " evil"])
def test_names_match_in_full(name: str) -> None:
    """`$` in a Python regex matches before a final newline: "evil\\n" passed (101 chars in a 100-char column)."""
    assert error_of(spec(name=name)).startswith("name: ")


def test_schema_patterns_agree_with_the_checks() -> None:
    """The patterns the OpenAPI document states are the rules the validators apply, exactly."""
    import re

    for value in [
        "a",
        "a/b",
        "./a",
        "a/",
        "...",
        ".a/..b",
        "a:b",
        "~a",
        "a/~b",
        "..",
        "a/../b",
        "a//b",
        "/a",
        "a\\b",
        "a\nb",
        "a\x00",
        "",
        ".",
        "preset:tiny",
        "preset:huge",
        "x/" * 10 + "y",
    ]:
        for allow_colon, pattern in ((True, PATH_PATTERN), (False, MODEL_DIR_PATTERN)):
            try:
                check_relative_path(value, "p", allow_colon=allow_colon)
                ok = True
            except ValueError:
                ok = False
            assert ok == bool(re.fullmatch(pattern.removeprefix("^").removesuffix("$"), value)), (value, pattern)


def test_schema_states_bounds_as_json_schema_keywords() -> None:
    """A bound pydantic cannot put into the JSON schema shows up as a stray 'ge'/'le': OpenAPI would not state it."""
    import json

    text = json.dumps(JobSpec.model_json_schema())
    for stray in ('"ge":', '"le":', '"gt":', '"lt":'):
        assert stray not in text
    props = JobSpec.model_json_schema()["properties"]
    assert props["max_steps"]["anyOf"][0]["maximum"] == MAX_STEPS and props["name"]["pattern"] == NAME_PATTERN
