"""The JobSpec: the body of `POST /jobs` and the input of the trainer.

Pure pydantic, no torch: the API validates specs with this module without loading a framework.
Validation here is what can be checked from the spec alone (shape, ranges, allow-lists, batch
arithmetic, path syntax); `trainer.paths` checks what needs the file system (roots, existence).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from trainer.batch import BatchPlan, resolve_batch
from trainer.presets import PRESETS

Auto = Literal["auto"]
PositiveInt = Annotated[int, Field(ge=1)]

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

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def check_relative_path(value: str, what: str) -> str:
    """Refuse paths that could leave a configured root, before any file system look-up."""
    if not value or "\x00" in value:
        raise ValueError(f"{what} must be a non-empty path without NUL bytes")
    if value.startswith(("/", "\\", "~")) or re.match(r"^[A-Za-z]:", value):
        raise ValueError(f"{what} must be relative to its configured root, not absolute: {value!r}")
    parts = re.split(r"[\\/]+", value)
    if ".." in parts:
        raise ValueError(f"{what} must not contain '..': {value!r}")
    return value


# --- the deepspeed block -------------------------------------------------------------------------


class Fp16Config(_Strict):
    enabled: bool | Auto = False
    auto_cast: bool = False
    loss_scale: float = Field(0.0, ge=0)
    initial_scale_power: int = Field(16, ge=0, le=40)
    loss_scale_window: int = Field(1000, ge=1)
    hysteresis: int = Field(2, ge=1)
    consecutive_hysteresis: bool = False
    min_loss_scale: float = Field(1.0, gt=0)


class Bf16Config(_Strict):
    enabled: bool | Auto = False
    immediate_grad_update: bool | None = None


class AdamParams(_Strict):
    lr: float = Field(5e-5, gt=0, le=10)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0, le=10)
    # Accepted because people paste them; the trainer picks the implementation (fused on GPU).
    torch_adam: bool | None = None
    adam_w_mode: bool | None = None

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError("betas must be two numbers in [0, 1)")
        return v


class OptimizerConfig(_Strict):
    type: Literal["AdamW", "Adam", "adamw", "adam"] = "AdamW"
    params: AdamParams = AdamParams()


class SchedulerParams(_Strict):
    # The bound sits on the number alone: on the union pydantic would apply it to "auto" (a TypeError).
    warmup_min_lr: Annotated[float, Field(ge=0)] | Auto = 0.0
    warmup_max_lr: float | Auto = "auto"
    warmup_num_steps: int | Auto = "auto"
    warmup_type: Literal["log", "linear"] = "linear"
    total_num_steps: int | Auto = "auto"
    warmup_min_ratio: float | None = Field(None, ge=0, le=1)
    cos_min_ratio: float | None = Field(None, ge=0, le=1)


class SchedulerConfig(_Strict):
    type: Literal["WarmupLR", "WarmupDecayLR", "WarmupCosineLR"]
    params: SchedulerParams = SchedulerParams()


class OffloadConfig(_Strict):
    device: Literal["cpu", "none"] = "none"
    pin_memory: bool = False
    ratio: float | None = Field(None, gt=0, le=1)
    fast_init: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _refuse_nvme(cls, data: Any) -> Any:
        if isinstance(data, dict):
            bad = sorted(REFUSED_OFFLOAD_KEYS & data.keys())
            if bad or data.get("device") == "nvme":
                raise ValueError(
                    "NVMe offload is refused: it writes swap files to a path; use device 'cpu' or 'none'"
                )
        return data


class ZeroConfig(_Strict):
    stage: int = Field(0, ge=0, le=3)
    allgather_partitions: bool = True
    allgather_bucket_size: int = Field(int(5e8), ge=1)
    overlap_comm: bool | None = None
    reduce_scatter: bool = True
    reduce_bucket_size: int | Auto = Field(int(5e8))
    contiguous_gradients: bool = True
    round_robin_gradients: bool = False
    sub_group_size: int = Field(int(1e9), ge=1)
    offload_optimizer: OffloadConfig | None = None
    offload_param: OffloadConfig | None = None
    stage3_prefetch_bucket_size: int | Auto = Field(int(5e7))
    stage3_param_persistence_threshold: int | Auto = Field(int(1e5))
    stage3_max_live_parameters: int = Field(int(1e9), ge=0)
    stage3_max_reuse_distance: int = Field(int(1e9), ge=0)
    stage3_gather_16bit_weights_on_model_save: bool = True
    zero_hpz_partition_size: int = Field(1, ge=1)
    zero_quantized_weights: bool = False
    zero_quantized_gradients: bool = False


class DeepSpeedConfig(_Strict):
    """A DeepSpeed config as people paste it, restricted to keys that cannot touch the file system."""

    train_batch_size: PositiveInt | Auto | None = None
    train_micro_batch_size_per_gpu: PositiveInt | Auto | None = None
    gradient_accumulation_steps: PositiveInt | Auto | None = None
    fp16: Fp16Config | None = None
    bf16: Bf16Config | None = None
    optimizer: OptimizerConfig = OptimizerConfig()
    scheduler: SchedulerConfig | None = None
    zero_optimization: ZeroConfig = ZeroConfig()
    gradient_clipping: float | Auto = Field(1.0)
    steps_per_print: int = Field(10**9, ge=1)
    wall_clock_breakdown: bool = False
    prescale_gradients: bool = False
    gradient_predivide_factor: float = Field(1.0, gt=0)
    communication_data_type: Literal["fp16", "bf16", "fp32"] | None = None
    zero_allow_untested_optimizer: bool = True
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
            raise ValueError("fp16 and bf16 cannot both be enabled; choose one")
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


class DatasetRef(_Strict):
    """Where the training text comes from: a path under the data root, or an uploaded dataset id."""

    path: str | None = None
    id: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    text_field: str = Field("text", min_length=1, max_length=100)
    format: Literal["auto", "jsonl", "text"] = "auto"

    @model_validator(mode="after")
    def _path_or_id(self) -> DatasetRef:
        if (self.path is None) == (self.id is None):
            raise ValueError("dataset needs exactly one of 'path' (under the data root) or 'id' (an upload)")
        if self.path is not None:
            check_relative_path(self.path, "dataset.path")
        return self


class JobSpec(_Strict):
    """One training job: model, data, GPUs and a DeepSpeed config."""

    name: str = Field(..., description="letters, digits, '.', '_' and '-', at most 100")
    model: str = Field(..., max_length=300, description="preset:<name>, a dir under the model root, or a hub id")
    dataset: DatasetRef
    gpus: int = Field(1, ge=1, le=64)
    seq_len: int = Field(512, ge=8, le=32768)
    epochs: int = Field(1, ge=1, le=1000)
    max_steps: int | None = Field(None, ge=1)
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    checkpoint_every: int = Field(500, ge=0, description="optimizer steps between checkpoints; 0: only at the end")
    keep_checkpoints: int = Field(2, ge=1, le=20)
    gradient_checkpointing: bool = False
    seed: int = Field(42, ge=0, le=2**31 - 1)
    priority: int = Field(0, ge=-100, le=100)
    max_runtime_s: int | None = Field(86400, ge=1, le=60 * 86400)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("name must be 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit")
        return v

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        if v.startswith("preset:"):
            if v.removeprefix("preset:") not in PRESETS:
                raise ValueError(f"unknown preset {v!r}; presets: {', '.join('preset:' + p for p in PRESETS)}")
            return v
        check_relative_path(v, "model")
        return v

    @model_validator(mode="after")
    def _batch_arithmetic(self) -> JobSpec:
        self.batch  # noqa: B018 - raises ValueError naming the valid choices
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

    @property
    def is_hub_id(self) -> bool:
        return not self.model.startswith("preset:") and bool(_HUB_ID.match(self.model))


def describe_errors(exc: Any) -> str:
    """A pydantic ValidationError as one line per problem: `field.path: message`."""
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'spec'}: {err['msg'].removeprefix('Value error, ')}"
        for err in exc.errors()
    )
