"""What goes out of the API (the JobSpec in trainer.spec is what comes in)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import Row

from core.models import Job
from core.progress import LATEST_FIELDS, progress_of
from core.queue import queue_position, start_eta_s
from trainer.events import ErrorType


class Progress(BaseModel):
    step: int | None = None
    total_steps: int | None = None
    epoch: int | None = None
    fraction: float | None = Field(None, description="step / total_steps")
    eta_s: float | None = Field(None, description="seconds left at this attempt's average step rate")


class Latest(BaseModel):
    step: int | None = None
    epoch: int | None = None
    loss: float | None = None
    lr: float | None = None
    samples_per_s: float | None = None
    tokens_per_s: float | None = None
    mfu: float | None = None
    gpu_mem_gb: float | None = None
    eval_loss: float | None = Field(None, description="the newest validation loss (jobs with a validation set)")
    time: float | None = Field(None, description="when the newest step was written (Unix seconds)")


class JobSummary(BaseModel):
    id: str
    name: str
    owner: str
    state: str
    gpus: int
    gpu_ids: list[int] | None
    box: str | None
    priority: int
    attempt: int
    queue_position: int | None = Field(None, description="1-based position among queued jobs")
    start_eta_s: float | None = Field(
        None, description="queued: seconds until it should start, from the running jobs' progress (None: unknown)"
    )
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    paused_at: datetime | None = Field(
        None,
        description="held by a pause (POST /v1/fine_tuning/jobs/{id}/pause): the scheduler passes it over until "
        "resumed; a running job was checkpointed and sent back to the queue",
    )
    progress: Progress
    latest: Latest | None
    error: dict[str, Any] | None = Field(
        description="a failed job's {type, message, log_tail, exit_code}; type in "
        + ", ".join(ErrorType)
        + " (disk: a checkpoint did not fit on the runs' disk)"
    )
    disk_bytes: int | None = Field(
        None,
        description="bytes its run directory takes, as the worker last measured (after each checkpoint, "
        "at the end of each attempt, after a prune); null until measured",
    )

    @classmethod
    def of(cls, job: Job | Row[Any], **extra: Any) -> Any:
        """The job as the API shows it, from a Job or a row of core.jobs.JOB_COLUMNS: every field not derived
        is the column of its name; its queue position and start ETA are the stored ones (core.queue)."""
        latest = job.latest
        return cls(
            **{name: getattr(job, name) for name in cls.model_fields if name not in _DERIVED},
            queue_position=queue_position(job),
            start_eta_s=start_eta_s(job),
            progress=Progress(**progress_of(job)),
            latest=Latest(**{k: latest.get(k) for k in (*LATEST_FIELDS, "time")}) if latest else None,
            **extra,
        )


# The fields of JobSummary and JobRead that are not a column of the job.
_DERIVED = frozenset({"queue_position", "start_eta_s", "progress", "latest", "artifacts"})


class Artifact(BaseModel):
    name: str = Field(description="path relative to the run directory; GET /jobs/{id}/artifacts/{name}")
    size: int


class Checkpoint(BaseModel):
    name: str = Field(description="GET /jobs/{id}/artifacts/{name}: the checkpoint directory as a tar")
    step: int
    size: int
    files: list[Artifact] = Field([], description="its files, each downloadable on its own")


class Artifacts(BaseModel):
    model: list[Artifact] = Field(description="the final model (Hugging Face format), once saved")
    checkpoints: list[Checkpoint] = Field(description="complete DeepSpeed checkpoints, oldest first")


class ArtifactsLink(BaseModel):
    href: str = Field(description="GET it for the listing (the final model's files and the checkpoints)")


class JobRead(JobSummary):
    spec: dict[str, Any]
    max_attempts: int
    cancel_requested: bool
    artifacts: ArtifactsLink | None = Field(
        None, description="where the artifacts are listed (GET /jobs/{id}/artifacts); disk_bytes gives their size"
    )

    @classmethod
    def of(cls, job: Job | Row[Any], **extra: Any) -> Any:
        """The job as GET /jobs/{id} shows it, from its row alone (queue position and ETA are stored on it)."""
        # A link to where the artifacts are listed: reading a job never walks its run directory.
        return super().of(job, artifacts=ArtifactsLink(href=f"/jobs/{job.id}/artifacts"), **extra)


class JobPage(BaseModel):
    data: list[JobSummary]
    next_cursor: str | None = Field(None, description="pass as `cursor` for the next (older) page")


class Metric(BaseModel):
    step: int
    attempt: int
    epoch: int | None
    loss: float | None
    lr: float | None
    samples_per_s: float | None
    tokens_per_s: float | None
    mfu: float | None
    gpu_mem_gb: float | None
    eval_loss: float | None = Field(None, description="the validation loss at this step, where one was evaluated")
    time: float


class MetricPage(BaseModel):
    data: list[Metric]
    next_after_step: int | None = Field(None, description="pass as `after_step` for the next page")


class MemoryEstimate(BaseModel):
    per_gpu_gb: float | None
    breakdown_gb: dict[str, float]
    gpu_memory_gb: float | None = Field(None, description="smallest GPU on a box that can hold the job")
    fits: bool | None = Field(None, description="None when there is no GPU (or no size) to compare with")
    notes: list[str] = []


class DataStatsRead(BaseModel):
    """One data file as the dry run sees it: counted or estimated from its first records (trainer.datastats)."""

    file_format: str = Field(description="jsonl or text (plain lines)")
    data_format: str = Field(description="text, prompt_completion or chat")
    bytes: int
    records: int
    records_counted: bool = Field(description="false: estimated from the first records' bytes per record")
    estimated_tokens: int = Field(description="about 4 bytes per token; the trainer counts exactly")
    trained_share: float = Field(description="share of the tokens trained on (the rest is prompt/context)")
    overlong: int = Field(description="examples longer than seq_len (estimated)")
    overlong_policy: str = Field(description="dropped, truncated (dataset.overlong), or packed (text)")


class SplitRead(BaseModel):
    fraction: float
    train_records: int
    validation_records: int


class DataReport(BaseModel):
    train: DataStatsRead
    validation: DataStatsRead | None = Field(None, description="the validation file, if the spec names one")
    split: SplitRead | None = Field(None, description="the held-out split (validation_split), if any")


class ValidateResult(BaseModel):
    valid: bool = True
    world_size: int
    micro_batch: int
    grad_accum: int
    train_batch_size: int
    max_runtime_s: int = Field(description="as given, or the default the job would get (see notes)")
    precision: str
    notes: list[str]
    n_params: int | None
    model: dict[str, str]
    data: DataReport
    deepspeed_config: dict[str, Any]
    memory: MemoryEstimate
    queue_position: int


class GpuRead(BaseModel):
    index: int
    name: str
    memory_mb: int | None
    memory_used_mb: int | None
    busy: bool = Field(False, description="used by processes outside trainbox: not given to jobs until they leave")
    job: dict[str, Any] | None = Field(None, description="{id, name, owner, state} of the job holding it")


class BoxRead(BaseModel):
    name: str
    queue: str
    heartbeat_at: datetime
    gpus: list[GpuRead]


class GpuView(BaseModel):
    data: list[BoxRead]
    total: int
    in_use: int


class DatasetRead(BaseModel):
    id: str = Field(description='name it in a spec: "dataset": {"id": ...}')
    filename: str = Field(description="the uploaded file's name (a label only)")
    format: str
    text_field: str
    records: int
    bytes: int
    sha256: str
    created_at: datetime


class DatasetPage(BaseModel):
    data: list[DatasetRead]


class QueueEntry(BaseModel):
    id: str | None = Field(None, description="only for your own jobs (admins: every job)")
    name: str
    owner: str
    state: str
    gpus: int
    priority: int
    queue_position: int | None = None
    start_eta_s: float | None = Field(None, description="queued: seconds until it should start (None: unknown)")
    box: str | None
    gpu_ids: list[int] | None
    created_at: datetime
    started_at: datetime | None


class QueueView(BaseModel):
    data: list[QueueEntry] = Field(description="every unfinished job: running first, then the queue in order")


class LimitsRead(BaseModel):
    max_gpus: int | None
    max_queued: int
    max_runtime_s: int
    max_priority: int | None
    submit_rate_per_minute: int
    max_datasets: int = Field(description="uploaded datasets you may keep")
    max_dataset_bytes: int = Field(description="total bytes of your uploaded datasets")
    max_tokens: int = Field(description="live API tokens you may hold (POST /tokens)")
    max_disk_bytes: int | None = Field(
        None, description="disk your run directories and uploads may take; at or over it, no submission (null: no cap)"
    )


class DiskUsageRead(BaseModel):
    jobs_bytes: int = Field(description="your jobs' run directories (checkpoints, models, logs), as last measured")
    uploads_bytes: int = Field(description="your uploaded datasets")
    total_bytes: int = Field(description="what counts against max_disk_bytes")


class UserRead(BaseModel):
    name: str
    is_admin: bool
    limits: LimitsRead
    disk: DiskUsageRead | None = None
