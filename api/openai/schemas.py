"""What /v1 takes and answers, field for field as the official `openai` package's types read them
(openai/types/file_object.py, openai/types/fine_tuning/)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from trainer.spec import MAX_EPOCHS, MAX_SEED, MAX_TRAIN_BATCH

Auto = Literal["auto"]


class FileObject(BaseModel):
    id: str = Field(description="\"file-\" + the upload's dataset id (or + a job id: that job's metrics CSV)")
    object: Literal["file"] = "file"
    bytes: int
    created_at: int = Field(description="Unix seconds")
    filename: str
    purpose: Literal["fine-tune", "fine-tune-results"]
    status: Literal["uploaded", "processed", "error"] = "processed"
    status_details: str | None = None
    expires_at: int | None = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


# --- fine-tuning jobs ------------------------------------------------------------------------------


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Hyperparameters(_In):
    n_epochs: Annotated[int, Field(ge=1, le=MAX_EPOCHS)] | Auto | None = None
    batch_size: Annotated[int, Field(ge=1, le=MAX_TRAIN_BATCH)] | Auto | None = None
    learning_rate_multiplier: Annotated[float, Field(gt=0, le=1000)] | Auto | None = None


class Supervised(_In):
    hyperparameters: Hyperparameters | None = None


class Method(BaseModel):
    # Not forbidding extras: `dpo` and `reinforcement` blocks are refused by `type` with a clear message.
    type: str
    supervised: Supervised | None = None


class TrainboxOptions(_In):
    """The trainbox-specific part of a fine-tuning job (the openai client sends it with `extra_body`):
    JobSpec fields, checked by the same rules as POST /jobs."""

    gpus: Any = None
    seq_len: Any = None
    priority: Any = None
    max_runtime_s: Any = None
    max_steps: Any = None
    checkpoint_every: Any = None
    keep_checkpoints: Any = None
    eval_every: Any = None
    keep_best: Any = None
    validation_split: Any = None
    gradient_checkpointing: Any = None
    train_on: Literal["completions", "all"] | None = None
    overlong: Literal["drop", "truncate"] | None = None
    deepspeed: dict[str, Any] | None = None


Metadata = Annotated[
    dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]], Field(max_length=16)
]


class JobCreate(_In):
    """POST /v1/fine_tuning/jobs."""

    model: str = Field(min_length=1, max_length=300)
    training_file: str = Field(min_length=1, max_length=100)
    validation_file: str | None = Field(None, max_length=100)
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    suffix: str | None = Field(None, max_length=64)
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    metadata: Metadata | None = None
    integrations: list[Any] | None = None
    trainbox: TrainboxOptions | None = None


class JobHyperparameters(BaseModel):
    n_epochs: int | None = None
    batch_size: int | None = None
    learning_rate_multiplier: float | None = None


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class JobMethod(BaseModel):
    type: Literal["supervised"] = "supervised"
    supervised: dict[str, Any]


class FineTuningJob(BaseModel):
    id: str = Field(description='"ftjob-" + the trainbox job id (GET /jobs/{id} shows the same job)')
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    model: str
    created_at: int
    finished_at: int | None
    status: Literal["validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled"]
    fine_tuned_model: str | None
    organization_id: str
    result_files: list[str]
    hyperparameters: JobHyperparameters
    method: JobMethod
    seed: int
    trained_tokens: int | None
    training_file: str
    validation_file: str | None
    estimated_finish: int | None
    error: JobError | None
    metadata: dict[str, str] | None
    integrations: list[Any] = []
    user_provided_suffix: str | None = None


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJob]
    has_more: bool


class JobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any] | None = None


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobEvent]
    has_more: bool


class CheckpointMetrics(BaseModel):
    step: float | None = None
    train_loss: float | None = None
    valid_loss: float | None = None
    full_valid_loss: float | None = None


class JobCheckpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str = Field(description="the checkpoint's name: GET /jobs/{id}/artifacts/{name}")
    fine_tuning_job_id: str
    step_number: int
    metrics: CheckpointMetrics


class CheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobCheckpoint]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None
