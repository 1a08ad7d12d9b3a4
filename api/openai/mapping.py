"""The OpenAI view of trainbox's datasets and jobs: ids, the request -> JobSpec mapping, job -> fine_tuning.job.

A file is an uploaded dataset (`file-<dataset id>`) or a job's metrics CSV (`file-<job id>`); a
fine-tuning job is a job (`ftjob-<job id>`). Nothing here is stored twice: each object is read from
the one row it views (docs/OPENAI.md has the tables).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import time
from pathlib import Path
from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from sqlalchemy.orm import Session

from api.artifacts import tail_lines
from api.errors import NotFound
from api.openai.errors import BadRequest
from api.openai.schemas import (
    FileObject,
    FineTuningJob,
    Hyperparameters,
    JobCreate,
    JobError,
    JobHyperparameters,
    JobMethod,
)
from core.jobs import list_metrics, metric_dict
from core.models import Dataset, Job
from core.progress import progress_of
from core.states import JobState
from core.users import Principal
from trainer.events import EVENTS_FILE
from trainer.spec import NAME_PATTERN, AdamParams, JobSpec

FILE_PREFIX = "file-"
JOB_PREFIX = "ftjob-"
# learning_rate_multiplier 1 is this learning rate: the JobSpec's own default (AdamW, full fine-tuning).
BASE_LEARNING_RATE = AdamParams().lr
# "auto" (OpenAI's published defaults): about 3 epochs, at least ~100 and at most ~25,000 examples seen,
# 1 to 25 epochs; a batch of about 0.2% of the examples, a power of two from 1 to 256, and a learning
# rate that grows with the square root of the batch (x1 at 32 examples, within x0.5 to x2).
TARGET_EPOCHS, MIN_EXAMPLES, MAX_EXAMPLES, MAX_AUTO_EPOCHS = 3, 100, 25_000, 25
MAX_AUTO_BATCH = 256
_NAME = re.compile(NAME_PATTERN.removeprefix("^").removesuffix("$"))

STATUS = {
    JobState.QUEUED: "queued",
    # Placed: the worker launches the ranks, which check every record of the data before the first step.
    JobState.STARTING: "validating_files",
    JobState.RUNNING: "running",
    # Still running until its processes are gone (it may yet end succeeded); then cancelled.
    JobState.CANCELLING: "running",
    JobState.SUCCEEDED: "succeeded",
    JobState.FAILED: "failed",
    JobState.CANCELLED: "cancelled",
}


def status_of(job: Job) -> str:
    """The OpenAI status: the state's, and `paused` for a paused job once it is back in the queue."""
    if job.paused_at is not None and job.state == JobState.QUEUED:
        return "paused"
    return STATUS[JobState(job.state)]


# --- ids -----------------------------------------------------------------------------------------


def file_id(object_id: str) -> str:
    return FILE_PREFIX + object_id


def job_ref(job_id: str) -> str:
    return JOB_PREFIX + job_id


def parse_job_id(ref: str) -> str:
    """The trainbox job id of `ftjob-<id>` (the bare id is accepted too)."""
    return ref.removeprefix(JOB_PREFIX)


def parse_file_id(ref: str) -> str:
    """The dataset or job id a file id names (404 for anything else)."""
    object_id = ref.removeprefix(FILE_PREFIX)
    if not ref.startswith(FILE_PREFIX) or not re.fullmatch(r"[dj][0-9a-z]{1,31}", object_id):
        raise NotFound(f"no file with id {ref!r}", ["path", "file_id"], type_="file_not_found")
    return object_id


def dataset_for(session: Session, user: Principal, ref: str, param: str = "file_id") -> Dataset:
    """The upload a file id names, if the caller may see it; 404 otherwise (ids are not confirmed)."""
    row = session.get(Dataset, parse_file_id(ref)) if ref.startswith(FILE_PREFIX + "d") else None
    if row is None or not user.can_see(row.owner):
        raise NotFound(f"no file with id {ref!r}", ["path", param], type_="file_not_found")
    return row


def file_object(row: Dataset) -> FileObject:
    return FileObject(
        id=file_id(row.id),
        bytes=row.bytes,
        created_at=int(row.created_at.timestamp()),
        filename=row.filename,
        purpose="fine-tune",
    )


# --- the results file: a job's metric history as CSV ----------------------------------------------

RESULT_COLUMNS = ("step", "train_loss", "valid_loss", "epoch", "lr", "tokens_per_s")


def results_csv(session: Session, job_id: str) -> bytes:
    """step, train_loss, valid_loss (empty where no evaluation ran), epoch, lr, tokens_per_s per stored step."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(RESULT_COLUMNS)
    after = -1
    while rows := list_metrics(session, job_id, after_step=after, limit=5000):
        for m in rows:
            d = metric_dict(m)
            writer.writerow(
                [
                    "" if v is None else v
                    for v in (m.step, d["loss"], d.get("eval_loss"), d["epoch"], d["lr"], d["tokens_per_s"])
                ]
            )
        after = rows[-1].step
    return out.getvalue().encode()


def results_file(session: Session, job: Job) -> FileObject:
    finished = job.finished_at or job.updated_at
    return FileObject(
        id=file_id(job.id),
        bytes=len(results_csv(session, job.id)),
        created_at=int(finished.timestamp()),
        filename=f"{job_ref(job.id)}-results.csv",
        purpose="fine-tune-results",
    )


def has_results(job: Job) -> bool:
    return JobState(job.state).is_terminal()


# --- request -> JobSpec --------------------------------------------------------------------------


def auto_epochs(records: int) -> int:
    if records * TARGET_EPOCHS < MIN_EXAMPLES:
        return min(MAX_AUTO_EPOCHS, max(1, MIN_EXAMPLES // max(records, 1)))
    if records * TARGET_EPOCHS > MAX_EXAMPLES:
        return max(1, MAX_EXAMPLES // records)
    return TARGET_EPOCHS


def auto_batch(records: int, gpus: int) -> int:
    """About 0.2% of the examples as a power of two in 1..256, rounded up to a multiple of the GPUs."""
    batch = 2 ** int(math.log2(max(1.0, records * 0.002)))
    batch = min(MAX_AUTO_BATCH, batch)
    return -(-batch // gpus) * gpus


def auto_lr_multiplier(batch: int) -> float:
    return round(min(2.0, max(0.5, math.sqrt(batch / 32))), 4)


def hyperparameters_of(req: JobCreate) -> Hyperparameters:
    """The hyperparameters, from `method.supervised` or the top level; 400 for another method."""
    if req.method is not None:
        if req.method.type in ("dpo", "reinforcement"):
            raise BadRequest(
                f"method {req.method.type!r} is not supported: trainbox fine-tunes with the supervised method only",
                ["body", "method", "type"],
                type_="unsupported_method",
            )
        if req.method.type != "supervised":
            raise BadRequest(
                f"unknown method {req.method.type!r}; the supported method is 'supervised'",
                ["body", "method", "type"],
                type_="invalid_value",
            )
        given = req.method.supervised.hyperparameters if req.method.supervised else None
        if given is not None and req.hyperparameters is not None:
            raise BadRequest(
                "give hyperparameters either at the top level or in method.supervised, not both",
                ["body", "hyperparameters"],
                type_="invalid_value",
            )
        if given is not None:
            return given
    return req.hyperparameters or Hyperparameters()


def job_name(req: JobCreate) -> str:
    if req.suffix is not None:
        if not _NAME.fullmatch(req.suffix):
            raise BadRequest(
                "suffix must be letters, digits, '.', '_' or '-', starting with a letter or digit (at most 64)",
                ["body", "suffix"],
                type_="invalid_value",
            )
        return req.suffix
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", req.model.rsplit("/", 1)[-1].removeprefix("preset:")).strip("-._")
    return f"ft-{base}"[:64]


def spec_body(req: JobCreate, *, train: Dataset, validation: Dataset | None) -> dict[str, Any]:
    """The JobSpec body the request describes (the caller validates it with JobSpec's own rules)."""
    hp = hyperparameters_of(req)
    opts = req.trainbox.model_dump(exclude_none=True) if req.trainbox else {}
    dataset: dict[str, Any] = {"id": train.id}
    for key in ("train_on", "overlong"):
        if key in opts:
            dataset[key] = opts.pop(key)
    deepspeed: dict[str, Any] = dict(opts.pop("deepspeed", {}) or {})
    body: dict[str, Any] = {"name": job_name(req), "model": req.model, "dataset": dataset, **opts}
    if validation is not None:
        body["validation"] = {"id": validation.id}
    body["epochs"] = hp.n_epochs if isinstance(hp.n_epochs, int) else auto_epochs(train.records)
    if req.seed is not None:
        body["seed"] = req.seed
    gpus = opts.get("gpus", 1)
    batch_keys = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
    if isinstance(hp.batch_size, int):
        if deepspeed.get("train_batch_size") not in (None, hp.batch_size):
            raise BadRequest(
                "hyperparameters.batch_size and trainbox.deepspeed.train_batch_size differ; give one",
                ["body", "hyperparameters", "batch_size"],
                type_="invalid_value",
            )
        deepspeed["train_batch_size"] = hp.batch_size
    elif not any(deepspeed.get(k) is not None for k in batch_keys) and isinstance(gpus, int) and gpus >= 1:
        deepspeed["train_batch_size"] = auto_batch(train.records, gpus)
    optimizer = dict(deepspeed.get("optimizer") or {})
    params = dict(optimizer.get("params") or {})
    if isinstance(hp.learning_rate_multiplier, int | float):
        if "lr" in params:
            raise BadRequest(
                "hyperparameters.learning_rate_multiplier and trainbox.deepspeed.optimizer.params.lr both set the "
                "learning rate; give one",
                ["body", "hyperparameters", "learning_rate_multiplier"],
                type_="invalid_value",
            )
        params["lr"] = BASE_LEARNING_RATE * hp.learning_rate_multiplier
    elif "lr" not in params and isinstance(deepspeed.get("train_batch_size"), int):
        params["lr"] = BASE_LEARNING_RATE * auto_lr_multiplier(deepspeed["train_batch_size"])
    if params:
        deepspeed["optimizer"] = {**optimizer, "params": params}
    if deepspeed:
        body["deepspeed"] = deepspeed
    return body


# Where a JobSpec field came from in the request, for the error's `param`.
_PARAMS = {
    "epochs": ["hyperparameters", "n_epochs"],
    "seed": ["seed"],
    "model": ["model"],
    "name": ["suffix"],
    "dataset": ["training_file"],
    "validation": ["validation_file"],
}


def request_loc(loc: list[Any] | tuple[Any, ...], req: JobCreate) -> list[Any]:
    """Where a JobSpec field (`loc` without "body") came from in the request: its OpenAI field, or `trainbox`."""
    loc = list(loc)
    head = str(loc[0]) if loc else ""
    if head in ("dataset", "validation"):
        return _PARAMS[head]
    if head in _PARAMS:
        return [*_PARAMS[head], *loc[1:]]
    if loc[:2] == ["deepspeed", "train_batch_size"] and req.hyperparameters is not None:
        return ["hyperparameters", "batch_size"]
    return ["trainbox", *loc]


def validate_spec(body: dict[str, Any], req: JobCreate) -> JobSpec:
    """JobSpec(body): a refusal is the same error POST /jobs gives, located in the request's own fields."""
    try:
        return JobSpec.model_validate(body)
    except ValidationError as e:
        errors = [{**err, "loc": ("body", *request_loc(err.get("loc", ()), req))} for err in e.errors()]
        raise RequestValidationError(errors) from None


# --- job -> fine_tuning.job ----------------------------------------------------------------------


def trained_tokens(run_dir: Path) -> int | None:
    """The tokens a finished run trained on (its last step event's count), or None if none was written."""
    try:
        lines = tail_lines(run_dir / EVENTS_FILE, 64)
    except OSError:
        return None
    for line in reversed(lines):
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("type") == "step" and "trained_tokens" in event:
            return int(event["trained_tokens"])
    return None


def model_name(job: Job) -> str:
    """`ft:<base>:<owner>:<suffix>:<job ref>`: the job's model (GET /jobs/{id}/artifacts), and its checkpoints'."""
    return f"ft:{job.spec['model']}:{job.owner}:{job.suffix or ''}:{job_ref(job.id)}"


def data_ref(ref: dict[str, Any] | None) -> str | None:
    if not ref:
        return None
    return file_id(ref["id"]) if ref.get("id") else ref.get("path")


def fine_tuning_job(job: Job, *, run_dir: Path, now: float | None = None) -> FineTuningJob:
    spec = JobSpec.model_validate(job.spec)
    lr = spec.deepspeed.optimizer.params.lr
    hyper = JobHyperparameters(
        n_epochs=spec.epochs,
        batch_size=spec.batch.train,
        learning_rate_multiplier=round(lr / BASE_LEARNING_RATE, 6),
    )
    eta = progress_of(job, now)["eta_s"] if job.state == JobState.RUNNING else None
    error = job.error or None
    terminal = JobState(job.state).is_terminal()
    return FineTuningJob(
        id=job_ref(job.id),
        model=spec.model,
        created_at=int(job.created_at.timestamp()),
        finished_at=int(job.finished_at.timestamp()) if job.finished_at and terminal else None,
        status=status_of(job),  # type: ignore[arg-type]
        fine_tuned_model=model_name(job) if job.state == JobState.SUCCEEDED else None,
        organization_id=job.owner,
        result_files=[file_id(job.id)] if has_results(job) else [],
        hyperparameters=hyper,
        method=JobMethod(supervised={"hyperparameters": hyper.model_dump()}),
        seed=spec.seed,
        trained_tokens=trained_tokens(run_dir) if terminal else None,
        training_file=data_ref(job.spec.get("dataset")) or "",
        validation_file=data_ref(job.spec.get("validation")),
        estimated_finish=int((now or time.time()) + eta) if eta is not None else None,
        error=JobError(code=str(error.get("type", "error")), message=str(error.get("message", ""))) if error else None,
        metadata=job.job_metadata,
        user_provided_suffix=job.suffix,
    )
