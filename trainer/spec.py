"""The JobSpec: the body of `POST /jobs` and the input of the trainer.

Pure pydantic, no torch: the API validates specs with this module without loading a framework.
Validation here is what can be checked from the spec alone (shape, ranges, allow-lists, batch
arithmetic, path syntax); `trainer.paths` checks what needs the file system (roots, existence).
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, field_validator, model_validator
from pydantic_core import PydanticCustomError

from trainer.batch import BatchError, BatchPlan, resolve_batch
from trainer.presets import PRESETS

# --- limits: the one place they are defined ------------------------------------------------------
# Far above any sane job, far below what breaks something: step counters and metric rows are 32-bit
# integers in the database (Postgres INTEGER), so steps stay under 2**31 with room to spare; the
# batch numbers bound the work of the batch arithmetic and the memory estimate.
MAX_GPUS = 64
MAX_MICRO_BATCH = 4096  # sequences per GPU per micro-step
MAX_GRAD_ACCUM = 4096
MAX_TRAIN_BATCH = 1 << 20  # sequences per optimizer step, all GPUs together
MAX_SEQ_LEN = 32768
MAX_EPOCHS = 1000
MAX_STEPS = 1_000_000_000  # optimizer steps; also bounds checkpoint_every and scheduler steps
MAX_RUNTIME_S = 60 * 86400
MAX_SEED = 2**31 - 1
MAX_PRIORITY = 100
MAX_BUCKET = 1 << 40  # elements in a ZeRO bucket or threshold
MAX_NAME_LEN = 100

# Defaults a spec may leave out. A spec without max_runtime_s runs with DEFAULT_MAX_RUNTIME_S (or the
# user's cap when that is lower); the job and POST /jobs/validate show the value it got.
DEFAULT_MAX_RUNTIME_S = 86400


# --- number types --------------------------------------------------------------------------------
# Integers and numbers as JSON Schema means them: 3 and 3.0 are integers, true and "3" are not, and
# there is no NaN or Infinity (Python's JSON parser accepts both; stored JSON must never hold them).


def whole_number(v: Any) -> Any:
    """An integer as JSON Schema means it: 3 or 3.0, not true, "3" or 3.5 (for a before-validator)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise PydanticCustomError("int_type", "Input should be a valid integer")
    if isinstance(v, float):
        if not (math.isfinite(v) and v.is_integer()):
            raise PydanticCustomError("int_from_float", "Input should be a whole number")
        return int(v)
    return v


def _finite(v: Any) -> Any:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise PydanticCustomError("float_type", "Input should be a valid number")
    try:
        f = float(v)
    except OverflowError:
        f = math.inf
    if not math.isfinite(f):
        raise PydanticCustomError("finite_number", "Input should be a finite number (no NaN or Infinity)")
    return f


# The bounds go inside (`Annotated[int, Field(ge=1), _W]`): after a validator pydantic would still
# check them but drop them from the JSON schema (as unknown "ge"/"le" keywords).
_W = BeforeValidator(whole_number)
_F = BeforeValidator(_finite)
Bool = StrictBool
Auto = Literal["auto"]

# Keys that make DeepSpeed write files, read files or load code. The server owns these (or they
# are not offered at all): a spec must not be able to point DeepSpeed at arbitrary paths.
REFUSED_DS_KEYS: dict[str, str] = {
    "tensorboard": "writes files (monitor output path); trainbox streams metrics itself",
    "wandb": "sends data to an outside service and writes files",
    "csv_monitor": "writes files (monitor output path); trainbox streams metrics itself",
    "comet": "sends data to an outside service",
    "flops_profiler": "writes files (profiler output); MFU is reported in every step event",
    "autotuning": "writes files and launches processes",
    "aio": "configures NVMe swapping, which writes files",
    "checkpoint": "checkpoint loading and paths are set by the server",
    "elasticity": "changes the world size behind the scheduler's back",
    "data_efficiency": "loads data and code from paths",
    "curriculum_learning": "loads data from paths",
    "compression_training": "loads code paths",
    "nebula": "writes checkpoints to its own paths",
    "pipeline": "pipeline parallelism is not offered",
    "amp": "apex AMP loads code; use fp16 or bf16",
    "zero_force_ds_cpu_optimizer": "the optimizer is built by the trainer",
}
# Same idea one level down: NVMe offload writes swap files to a path.
REFUSED_OFFLOAD_KEYS = {"nvme_path", "buffer_count", "buffer_size", "max_in_cpu"}

# Names and paths, as patterns the OpenAPI document states and Python checks (`fullmatch`: a `$`
# would let "name\n" through). A path is relative, '/'-separated, without control characters, '\',
# a '..' component, empty components or a leading '~'; model directories also have no ':' (so no
# path can look like "preset:...").
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
_CTRL = r"\x00-\x1f\x7f"


def _path_pattern(extra: str = "") -> str:
    char = f"[^{_CTRL}/\\\\{extra}]"  # any character of a component
    nodot = f"[^{_CTRL}/\\\\.{extra}]"
    first = f"[^{_CTRL}/\\\\.~{extra}]"
    # A component that is not '..': '.', or a dot at most once before a non-dot, or '..' and more.
    comp = f"(?:\\.|\\.?{nodot}{char}*|\\.\\.{char}+)"
    head = f"(?:\\.|{first}{char}*|\\.{nodot}{char}*|\\.\\.{char}+)"
    return f"^{head}(?:/{comp})*/?$"


PATH_PATTERN = _path_pattern()
MODEL_DIR_PATTERN = _path_pattern(":")
PRESET_PATTERN = "^preset:(?:" + "|".join(p.replace(".", "\\.") for p in PRESETS) + ")$"
MODEL_PATTERN = f"{PRESET_PATTERN}|{MODEL_DIR_PATTERN}"
_NAME_RE = re.compile(NAME_PATTERN.removeprefix("^").removesuffix("$"))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def check_relative_path(value: str, what: str, *, allow_colon: bool = True) -> str:
    """Refuse paths that could leave a configured root, before any file system look-up.

    Exactly the paths PATH_PATTERN (MODEL_DIR_PATTERN without `allow_colon`) matches, each refusal
    with its own message.
    """
    if not value:
        raise ValueError(f"{what} must be a non-empty path")
    if re.search(f"[{_CTRL}]", value):
        raise ValueError(f"{what} must be a path without NUL bytes or other control characters: {value!r}")
    if "\\" in value:
        raise ValueError(f"{what} must use '/' to separate directories, not '\\': {value!r}")
    if value.startswith(("/", "~")):
        raise ValueError(f"{what} must be relative to its configured root, not absolute: {value!r}")
    if not allow_colon and ":" in value:
        raise ValueError(f"{what} must not contain ':' (a preset is named 'preset:<name>'): {value!r}")
    parts = value.removesuffix("/").split("/")
    if ".." in parts:
        raise ValueError(f"{what} must not contain '..': {value!r}")
    if "" in parts:
        raise ValueError(f"{what} must not contain empty components ('//'): {value!r}")
    return value


# --- the deepspeed block -------------------------------------------------------------------------


class Fp16Config(_Strict):
    enabled: Bool | Auto = False
    auto_cast: Bool = False
    loss_scale: Annotated[float, Field(ge=0, le=2.0**64), _F] = 0.0
    initial_scale_power: Annotated[int, Field(ge=0, le=40), _W] = 16
    loss_scale_window: Annotated[int, Field(ge=1, le=MAX_STEPS), _W] = 1000
    hysteresis: Annotated[int, Field(ge=1, le=MAX_STEPS), _W] = 2
    consecutive_hysteresis: Bool = False
    # DeepSpeed takes an integer here (a float is refused by its config parser).
    min_loss_scale: Annotated[int, Field(ge=1, le=2**40), _W] = 1


class Bf16Config(_Strict):
    enabled: Bool | Auto = False
    immediate_grad_update: Bool | None = None


class AdamParams(_Strict):
    lr: Annotated[float, Field(gt=0, le=10), _F] = 5e-5
    betas: tuple[Annotated[float, Field(ge=0, lt=1), _F], Annotated[float, Field(ge=0, lt=1), _F]] = (0.9, 0.999)
    eps: Annotated[float, Field(gt=0, le=1), _F] = 1e-8
    weight_decay: Annotated[float, Field(ge=0, le=10), _F] = 0.0
    # Accepted because people paste them; the trainer picks the implementation (fused on GPU).
    torch_adam: Bool | None = None
    adam_w_mode: Bool | None = None


class OptimizerConfig(_Strict):
    type: Literal["AdamW", "Adam", "adamw", "adam"] = "AdamW"
    params: AdamParams = AdamParams()


Steps = Annotated[int, Field(ge=1, le=MAX_STEPS), _W]
LearningRate = Annotated[float, Field(ge=0, le=10), _F]
Ratio = Annotated[float, Field(ge=0, le=1), _F]


class SchedulerParams(_Strict):
    # Bounds sit on the number alone: on the union pydantic would apply them to "auto" (a TypeError).
    warmup_min_lr: LearningRate | Auto = 0.0
    warmup_max_lr: LearningRate | Auto = "auto"
    # DeepSpeed refuses 0 and negative warmup steps when it builds the scheduler, after the queue.
    warmup_num_steps: Steps | Auto = "auto"
    warmup_type: Literal["log", "linear"] = "linear"
    total_num_steps: Steps | Auto = "auto"
    warmup_min_ratio: Ratio | None = None
    cos_min_ratio: Ratio | None = None


class SchedulerConfig(_Strict):
    type: Literal["WarmupLR", "WarmupDecayLR", "WarmupCosineLR"]
    params: SchedulerParams = SchedulerParams()


class OffloadParamConfig(_Strict):
    device: Literal["cpu", "none"] = "none"
    pin_memory: Bool = False

    @model_validator(mode="before")
    @classmethod
    def _refuse_nvme(cls, data: Any) -> Any:
        if isinstance(data, dict):
            bad = sorted(REFUSED_OFFLOAD_KEYS & data.keys())
            if bad or data.get("device") == "nvme":
                raise ValueError("NVMe offload is refused: it writes swap files to a path; use device 'cpu' or 'none'")
        return data


class OffloadConfig(OffloadParamConfig):
    """offload_optimizer: as offload_param, plus partial offload (ZeRO-3) and fast init."""

    ratio: Annotated[float, Field(gt=0, le=1), _F] | None = None
    fast_init: Bool | None = None


# Element counts for ZeRO's buckets and thresholds; DeepSpeed itself refuses a zero reduce bucket.
Bucket = Annotated[int, Field(ge=1, le=MAX_BUCKET), _W]
Count = Annotated[int, Field(ge=0, le=MAX_BUCKET), _W]


class ZeroConfig(_Strict):
    stage: Annotated[int, Field(ge=0, le=3), _W] = 0
    allgather_partitions: Bool = True
    allgather_bucket_size: Bucket = int(5e8)
    overlap_comm: Bool | None = None
    reduce_scatter: Bool = True
    # "auto" (as the Hugging Face examples write it) means DeepSpeed's default.
    reduce_bucket_size: Bucket | Auto = int(5e8)
    contiguous_gradients: Bool = True
    round_robin_gradients: Bool = False
    sub_group_size: Bucket = int(1e9)
    offload_optimizer: OffloadConfig | None = None
    offload_param: OffloadParamConfig | None = None
    stage3_prefetch_bucket_size: Count | Auto = int(5e7)
    stage3_param_persistence_threshold: Count | Auto = int(1e5)
    stage3_max_live_parameters: Count = int(1e9)
    stage3_max_reuse_distance: Count = int(1e9)
    stage3_gather_16bit_weights_on_model_save: Bool = True
    zero_hpz_partition_size: Annotated[int, Field(ge=1, le=MAX_GPUS), _W] = 1
    zero_quantized_weights: Bool = False
    zero_quantized_gradients: Bool = False

    @model_validator(mode="after")
    def _partial_offload_needs_stage_3(self) -> ZeroConfig:
        ratio = self.offload_optimizer.ratio if self.offload_optimizer else None
        if ratio is not None and ratio < 1 and self.stage != 3:
            msg = f"offload_optimizer.ratio {ratio} (partial offload) needs ZeRO stage 3, not stage {self.stage}"
            raise PydanticCustomError("deepspeed_conflict", "{msg}", {"msg": msg})
        return self


class DeepSpeedConfig(_Strict):
    """A DeepSpeed config as people paste it, restricted to keys that cannot touch the file system."""

    train_batch_size: Annotated[int, Field(ge=1, le=MAX_TRAIN_BATCH), _W] | Auto | None = None
    train_micro_batch_size_per_gpu: Annotated[int, Field(ge=1, le=MAX_MICRO_BATCH), _W] | Auto | None = None
    gradient_accumulation_steps: Annotated[int, Field(ge=1, le=MAX_GRAD_ACCUM), _W] | Auto | None = None
    fp16: Fp16Config | None = None
    bf16: Bf16Config | None = None
    optimizer: OptimizerConfig = OptimizerConfig()
    scheduler: SchedulerConfig | None = None
    zero_optimization: ZeroConfig = ZeroConfig()
    # 0 turns clipping off (as in DeepSpeed); DeepSpeed silently skips a negative value, so it is refused.
    gradient_clipping: Annotated[float, Field(ge=0, le=1e6), _F] | Auto = 1.0
    steps_per_print: Annotated[int, Field(ge=1, le=MAX_STEPS), _W] = MAX_STEPS
    wall_clock_breakdown: Bool = False
    prescale_gradients: Bool = False
    gradient_predivide_factor: Annotated[float, Field(gt=0, le=1e6), _F] = 1.0
    communication_data_type: Literal["fp16", "bf16", "fp32"] | None = None
    zero_allow_untested_optimizer: Bool = True
    seq_parallel_communication_data_type: Literal["fp16", "bf16", "fp32"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _refuse_dangerous_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if key in REFUSED_DS_KEYS:
                    raise ValueError(f"DeepSpeed key {key!r} is refused: {REFUSED_DS_KEYS[key]}")
                if key not in cls.model_fields:
                    allowed = ", ".join(sorted(cls.model_fields))
                    raise ValueError(f"unknown DeepSpeed key {key!r}; allowed keys: {allowed}")
        return data

    @model_validator(mode="after")
    def _one_precision(self) -> DeepSpeedConfig:
        if self.fp16_enabled and self.bf16_enabled:
            raise PydanticCustomError("precision_conflict", "fp16 and bf16 cannot both be enabled; choose one")
        return self

    @property
    def fp16_enabled(self) -> bool:
        return bool(self.fp16 and self.fp16.enabled is True)

    @property
    def bf16_enabled(self) -> bool:
        return bool(self.bf16 and self.bf16.enabled is True)

    @property
    def precision(self) -> Literal["fp16", "bf16", "fp32"]:
        return "fp16" if self.fp16_enabled else "bf16" if self.bf16_enabled else "fp32"


# --- the job spec -------------------------------------------------------------------------------


# What OpenAPI can say about "exactly one of path or id"; the validator below says it in words.
_ONE_OF_PATH_OR_ID = {
    "oneOf": [
        {"required": ["path"], "properties": {"path": {"type": "string"}}},
        {"required": ["id"], "properties": {"id": {"type": "string"}}},
    ]
}


DataFormat = Literal["auto", "text", "prompt_completion", "chat", "jsonl"]


class _FileRef(_Strict):
    """A data file: a path under the data root or an upload id, and how to read it."""

    model_config = ConfigDict(json_schema_extra=_ONE_OF_PATH_OR_ID)
    _field: ClassVar[str]  # the spec field it is, for the messages

    path: str | None = Field(None, max_length=1000, json_schema_extra={"pattern": PATH_PATTERN})
    id: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    text_field: str = Field("text", min_length=1, max_length=100)
    # auto: detected from the records (docs/DATA.md); jsonl: text records from JSONL (as `text`, kept
    # for specs written before the formats); text: a text field in JSONL, or plain text lines.
    format: DataFormat = "auto"

    @model_validator(mode="after")
    def _path_or_id(self) -> Self:
        if (self.path is None) == (self.id is None):
            raise ValueError(f"{self._field} needs exactly one of 'path' (under the data root) or 'id' (an upload)")
        if self.path is not None:
            check_relative_path(self.path, f"{self._field}.path")
        return self


class DatasetRef(_FileRef):
    """Where the training text comes from: a path under the data root, or an uploaded dataset id."""

    _field = "dataset"

    train_on: Literal["completions", "all"] | None = Field(
        None, description="completions (default for chat and prompt_completion): loss only on answers; all: every token"
    )
    overlong: Literal["drop", "truncate"] = Field(
        "drop", description="a chat or prompt_completion example longer than seq_len is dropped or truncated"
    )


class ValidationRef(_FileRef):
    """Held-out data judged by eval loss: a path under the data root or an upload id, in the training format."""

    _field = "validation"


class JobSpec(_Strict):
    """One training job: model, data, GPUs and a DeepSpeed config."""

    name: str = Field(
        ...,
        max_length=MAX_NAME_LEN,
        description="letters, digits, '.', '_' and '-', at most 100",
        json_schema_extra={"pattern": NAME_PATTERN},
    )
    model: str = Field(
        ...,
        min_length=1,
        max_length=300,
        description="preset:<name>, a dir under the model root, or a hub id",
        json_schema_extra={"pattern": MODEL_PATTERN},
    )
    dataset: DatasetRef
    gpus: Annotated[int, Field(ge=1, le=MAX_GPUS), _W] = 1
    seq_len: Annotated[int, Field(ge=8, le=MAX_SEQ_LEN), _W] = 512
    epochs: Annotated[int, Field(ge=1, le=MAX_EPOCHS), _W] = 1
    max_steps: Annotated[int, Field(ge=1, le=MAX_STEPS), _W] | None = None
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    checkpoint_every: Annotated[
        int, Field(ge=0, le=MAX_STEPS, description="optimizer steps between checkpoints; 0: only at the end"), _W
    ] = 500
    keep_checkpoints: Annotated[int, Field(ge=1, le=20), _W] = 2
    validation: ValidationRef | None = None
    validation_split: Annotated[
        float,
        Field(
            ge=0,
            le=0.5,
            description="fraction of the training records held out (by the seed) for eval; "
            "not with validation (422 validation_conflict)",
        ),
        _F,
    ] = 0.0
    eval_every: (
        Annotated[
            int, Field(ge=1, le=MAX_STEPS, description="steps between evaluations; left out: about 10 per run"), _W
        ]
        | None
    ) = None
    keep_best: Bool = Field(
        False,
        description="keep the lowest-eval-loss checkpoint and export it as the model; "
        "it and eval_every need validation or validation_split (422 validation_conflict)",
    )
    gradient_checkpointing: Bool = False
    seed: Annotated[int, Field(ge=0, le=MAX_SEED), _W] = 42
    priority: Annotated[int, Field(ge=-MAX_PRIORITY, le=MAX_PRIORITY), _W] = 0
    max_runtime_s: Annotated[
        int,
        Field(
            ge=1,
            le=MAX_RUNTIME_S,
            description=f"stop (checkpoint, then fail as `timeout`) after this many seconds of running; "
            f"left out: {DEFAULT_MAX_RUNTIME_S}, or your cap when that is lower",
        ),
        _W,
    ] = DEFAULT_MAX_RUNTIME_S

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.fullmatch(v):
            raise ValueError("name must be 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit")
        return v

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        if v.startswith("preset:"):
            if v.removeprefix("preset:") not in PRESETS:
                raise ValueError(f"unknown preset {v!r}; presets: {', '.join('preset:' + p for p in PRESETS)}")
            return v
        check_relative_path(v, "model", allow_colon=False)
        return v

    @model_validator(mode="after")
    def _validation(self) -> JobSpec:
        # A rule across fields (no JSON schema states it): the 422's type is `validation_conflict`.
        msg = None
        if self.validation is not None and self.validation_split > 0:
            msg = "give either validation (a file) or validation_split (a held-out fraction), not both"
        elif not self.has_validation and (asked := [n for n in ("eval_every", "keep_best") if getattr(self, n)]):
            msg = f"{asked[0]} needs validation data: set validation or validation_split"
        if msg:
            raise PydanticCustomError("validation_conflict", "{msg}", {"msg": msg})
        return self

    @property
    def has_validation(self) -> bool:
        return self.validation is not None or self.validation_split > 0

    @model_validator(mode="after")
    def _batch_arithmetic(self) -> JobSpec:
        try:
            plan = self.batch
        except BatchError as e:
            raise PydanticCustomError("batch_arithmetic", "{msg}", {"msg": str(e)}) from None
        for value, limit, what in (
            (plan.micro, MAX_MICRO_BATCH, "train_micro_batch_size_per_gpu"),
            (plan.accum, MAX_GRAD_ACCUM, "gradient_accumulation_steps"),
            (plan.train, MAX_TRAIN_BATCH, "train_batch_size"),
        ):
            if value > limit:
                msg = (
                    f"the batch resolves to {what} {value}, over the limit of {limit} "
                    f"(train_batch_size {plan.train} = micro {plan.micro} x accum {plan.accum} x {plan.gpus} GPUs)"
                )
                raise PydanticCustomError("batch_arithmetic", "{msg}", {"msg": msg})
        return self

    @property
    def batch(self) -> BatchPlan:
        ds = self.deepspeed

        def given(v: int | str | None) -> int | None:
            return v if isinstance(v, int) else None

        return resolve_batch(
            gpus=self.gpus,
            train=given(ds.train_batch_size),
            micro=given(ds.train_micro_batch_size_per_gpu),
            accum=given(ds.gradient_accumulation_steps),
        )


_UNION_TAGS = {"bool", "int", "float", "str", "none"}


def clean_loc(loc: Any) -> list[str | int]:
    """An error's location as field names only: without the tags pydantic adds for each member of a
    union (`function-before[...]`, `literal['auto']`, `bool`), which no spec field is named like."""
    return [
        p for p in loc if not (isinstance(p, str) and ("[" in p or p in _UNION_TAGS or p.startswith("constrained-")))
    ]


def describe_errors(exc: Any) -> str:
    """A pydantic ValidationError as one line per problem: `field.path: message`."""
    return "; ".join(
        f"{'.'.join(str(p) for p in clean_loc(err['loc'])) or 'spec'}: {err['msg'].removeprefix('Value error, ')}"
        for err in exc.errors()
    )
