"""Checks a spec needs beyond its own fields: files under the roots, what the boxes can hold, and the
validate dry run. Submit and validate run the same checks (`admit`), so validate answers what submit would.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import psutil
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.errors import Unprocessable
from api.estimate import GB, estimate_memory, model_config
from api.limits import check_spec_limits
from core.models import Dataset, Gpu
from core.scheduler import Dispatch, queue_position_for, schedule
from core.settings import Settings
from core.users import Principal
from trainer import dsconfig
from trainer.batch import divisors
from trainer.datastats import BYTES_PER_TOKEN, data_stats, held_out
from trainer.formats import Format, trains_all
from trainer.paths import (
    DatasetInfo,
    ModelSource,
    SpecError,
    check_same_format,
    inspect_dataset,
    resolve_dataset,
    resolve_model,
)
from trainer.spec import DEFAULT_MAX_RUNTIME_S, MAX_GRAD_ACCUM, MAX_STEPS, DatasetRef, JobSpec, ValidationRef

# Lines of the dataset read at submission: enough to catch a wrong format or text field early.
INSPECT_RECORDS = 200

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Files:
    """What a spec's files resolved to: the model, the training data and the validation file (if any)."""

    source: ModelSource
    train: DatasetInfo
    validation: DatasetInfo | None


def _upload(session: Session, ref: DatasetRef | ValidationRef, user: Principal, field: str) -> Dataset | None:
    """The upload a data reference names by id, if it is the user's own; to anyone else it does not exist."""
    if ref.id is None:
        return None
    # Held shared until the job is committed: DELETE /datasets/{id} (FOR UPDATE) waits for it.
    row = session.get(Dataset, ref.id, with_for_update={"read": True})
    if row is None or row.owner != user.name:
        raise Unprocessable(f"no uploaded dataset with id {ref.id!r}", ["body", field, "id"], type_="file_not_usable")
    return row


def check_files(spec: JobSpec, settings: Settings, session: Session, user: Principal) -> Files:
    """The model, dataset and validation file the spec names, resolved under their roots and their first
    records checked (both data files must be of one format); 422 naming the field and line if not.

    An upload's file was checked line by line when it was uploaded and its stats stored: a spec that
    reads it as it was checked (same format, same text field) does not read it again.
    """
    assert settings.model_root is not None and settings.data_root is not None
    train_row = _upload(session, spec.dataset, user, "dataset")
    val_row = _upload(session, spec.validation, user, "validation") if spec.validation is not None else None
    try:
        source = resolve_model(spec.model, settings.model_root)
        path = resolve_dataset(spec.dataset, settings.data_root)
        train = stored_info(train_row, spec.dataset, path) or inspect_first(path, spec.dataset)
        validation = None
        if spec.validation is not None:
            path = resolve_dataset(spec.validation, settings.data_root, "validation")
            validation = stored_info(val_row, spec.validation, path) or inspect_first(
                path, spec.validation, what="validation"
            )
            check_same_format(train, validation)
    except SpecError as e:
        loc: list[str | int] = ["body", *e.field.split(".")] if e.field else ["body"]
        raise Unprocessable(str(e), loc, type_="file_not_usable") from None
    return Files(source, train, validation)


def inspect_first(path: Path, ref: DatasetRef | ValidationRef, *, what: str = "dataset") -> DatasetInfo:
    """The file's first INSPECT_RECORDS records checked; a file unchanged since (same size and mtime) and
    read the same way is not read again (a sweep submits many jobs on one file)."""
    try:
        st = path.stat()
    except OSError:
        return inspect_dataset(path, ref, max_records=INSPECT_RECORDS, what=what)  # its error names the file
    return _inspect_unchanged(path, st.st_size, st.st_mtime_ns, ref, what)


@lru_cache(maxsize=256)
def _inspect_unchanged(path: Path, size: int, mtime_ns: int, ref: DatasetRef | ValidationRef, what: str) -> DatasetInfo:
    return inspect_dataset(path, ref, max_records=INSPECT_RECORDS, what=what)


def stored_info(row: Dataset | None, ref: DatasetRef | ValidationRef, path: Path) -> DatasetInfo | None:
    """An upload's stats as stored when it was checked, if the spec reads it the same way (else None).

    datasets.format is chat or prompt_completion (JSONL records of that format), jsonl (JSONL records
    with the stored text field) or text (plain text lines)."""
    if row is None or ref.format not in ("auto", row.format):
        return None
    if row.format == "jsonl" and ref.text_field != row.text_field:
        return None
    plain = row.format == "text"
    data_format: Format = row.format if row.format in ("chat", "prompt_completion") else "text"  # type: ignore[assignment]
    return DatasetInfo(
        path=path, format="text" if plain else "jsonl", records=row.records, bytes=row.bytes, data_format=data_format
    )


def box_sizes(session: Session) -> dict[str, list[int | None]]:
    """box -> memory (MB) of each of its GPUs (None for CPU slots); read once per session (a request's
    checks ask twice)."""
    cached: dict[str, list[int | None]] | None = session.info.get("box_sizes")
    if cached is not None:
        return cached
    out: dict[str, list[int | None]] = {}
    for box, memory in session.execute(select(Gpu.box, Gpu.memory_mb).order_by(Gpu.box, Gpu.index)):
        out.setdefault(box, []).append(memory)
    session.info["box_sizes"] = out
    return out


def check_fits_a_box(spec: JobSpec, session: Session) -> None:
    """422 when boxes are registered and none has as many GPUs as the spec asks for."""
    sizes = box_sizes(session)
    biggest = max((len(v) for v in sizes.values()), default=0)
    if sizes and spec.gpus > biggest:
        raise Unprocessable(
            f"gpus {spec.gpus} is more than any box has (the largest has {biggest}); a job runs on one box",
            ["body", "gpus"],
            type_="does_not_fit",
        )


def with_defaults(spec: JobSpec, user: Principal) -> tuple[JobSpec, list[str]]:
    """The spec with what it left out filled in as it will run, and a note for each value filled in.

    max_runtime_s left out: DEFAULT_MAX_RUNTIME_S, or the user's cap when that is lower (a default the
    user did not choose must not be refused as over their cap).
    """
    if "max_runtime_s" in spec.model_fields_set:
        return spec, []
    runtime = min(DEFAULT_MAX_RUNTIME_S, user.limits.max_runtime_s)
    note = f"max_runtime_s not given: {runtime} s" + (" (your cap)" if runtime < DEFAULT_MAX_RUNTIME_S else "")
    return spec.model_copy(update={"max_runtime_s": runtime}), [note]


def estimated_steps(spec: JobSpec, info: DatasetInfo) -> int:
    """max_steps, or epochs x steps per epoch estimated from the dataset's size (BYTES_PER_TOKEN), less
    the held-out split."""
    if spec.max_steps is not None:
        return spec.max_steps
    blocks = max(1, round(info.bytes * (1 - spec.validation_split)) // BYTES_PER_TOKEN // spec.seq_len)
    return spec.epochs * max(1, blocks // spec.batch.train)


def check_steps(spec: JobSpec, info: DatasetInfo) -> int:
    """422 when epochs over this dataset come to more optimizer steps than a job may have (MAX_STEPS)."""
    steps = estimated_steps(spec, info)
    if steps > MAX_STEPS:
        raise Unprocessable(
            f"epochs {spec.epochs} over this dataset come to about {steps} optimizer steps, over the limit of "
            f"{MAX_STEPS}; set max_steps, fewer epochs or a larger train_batch_size",
            ["body", "epochs"],
            type_="too_many_steps",
        )
    return steps


# --- memory admission ----------------------------------------------------------------------------


@dataclass
class Capacity:
    """What the job's ranks get on the best box for it: memory per rank (GB), and where that comes from."""

    per_rank_gb: float | None
    where: str
    on_gpu: bool
    gpu_gb: float | None = None  # per GPU, for `fits` (None: CPU box or no box registered)
    notes: list[str] = field(default_factory=list)


def capacity(spec: JobSpec, session: Session, settings: Settings) -> Capacity:
    """The most memory one rank of this job can have on any box that has enough GPUs (or slots).

    GPU box: its smallest GPU (a job's ranks all need to fit). CPU box: the host's memory, shared by
    the ranks (TRAINBOX_CPU_BOX_MEMORY_GB, default this machine's RAM: the embedded stack runs
    the API and the CPU worker on one machine). No box registered yet: TRAINBOX_ASSUMED_GPU_MEMORY_GB
    (the reference box's 24 GB); 0 skips the check until a box registers.
    """
    candidates = [mems for mems in box_sizes(session).values() if len(mems) >= spec.gpus]
    if not candidates:
        assumed = settings.assumed_gpu_memory_gb
        if not assumed:
            return Capacity(None, "", True, notes=["no box registered yet: memory not checked"])
        note = f"no box registered yet: checked against {assumed:g} GB GPUs (TRAINBOX_ASSUMED_GPU_MEMORY_GB)"
        return Capacity(assumed, f"{assumed:g} GB per GPU (no box registered yet)", True, notes=[note])
    gpu_boxes = [min(m for m in mems if m is not None) / 1024 for mems in candidates if None not in mems]
    if gpu_boxes:
        best = max(gpu_boxes)
        where = f"{best:.2f} GB per GPU on the best box with {spec.gpus} GPU{'s' if spec.gpus > 1 else ''}"
        return Capacity(best, where, True, best)
    host = settings.cpu_box_memory_gb or psutil.virtual_memory().total / GB
    return Capacity(
        host / spec.gpus,
        f"{host:.1f} GB of host memory shared by {spec.gpus} CPU rank{'s' if spec.gpus > 1 else ''}",
        False,
        notes=[f"CPU box: {spec.gpus} ranks share {host:.1f} GB of host memory"],
    )


def _variant(
    spec: JobSpec, *, ds: dict[str, Any] | None = None, zero: dict[str, Any] | None = None, **top: Any
) -> JobSpec:
    """A copy of the spec with some settings changed (no re-validation: for estimates only)."""
    deepspeed = spec.deepspeed
    if zero:
        zero_config = deepspeed.zero_optimization.model_copy(update=zero)
        deepspeed = deepspeed.model_copy(update={"zero_optimization": zero_config})
    if ds:
        deepspeed = deepspeed.model_copy(update=ds)
    return spec.model_copy(update={**top, "deepspeed": deepspeed})


def nearest_fits(spec: JobSpec, cfg: dict[str, Any], precision: str, limit_gb: float) -> list[str]:
    """Settings near the spec's that the estimate says fit in limit_gb per rank, fewest changes first."""

    def gb(s: JobSpec) -> float:
        return float(estimate_memory(s, cfg, precision)["per_gpu_gb"])

    plan = spec.batch
    out: list[str] = []

    def smaller_micro(base: JobSpec, extra: str = "") -> bool:
        # The same train_batch_size with a smaller micro batch and more accumulation.
        per_rank = plan.train // plan.gpus
        for m in reversed(divisors(per_rank)):
            accum = per_rank // m
            if m >= plan.micro or accum > MAX_GRAD_ACCUM:
                continue
            s = _variant(
                base,
                ds={
                    "train_batch_size": plan.train,
                    "train_micro_batch_size_per_gpu": m,
                    "gradient_accumulation_steps": accum,
                },
            )
            if gb(s) <= limit_gb:
                out.append(
                    f"{extra}train_micro_batch_size_per_gpu {m} with gradient_accumulation_steps {accum} "
                    f"(same train_batch_size {plan.train}): ~{gb(s):.1f} GB"
                )
                return True
        return False

    smaller_micro(spec)
    if not spec.gradient_checkpointing:
        s = _variant(spec, gradient_checkpointing=True)
        if gb(s) <= limit_gb:
            out.append(f"gradient_checkpointing true: ~{gb(s):.1f} GB")
        else:
            smaller_micro(s, "gradient_checkpointing true and ")
    zero = spec.deepspeed.zero_optimization
    if plan.gpus > 1:
        for stage in range(zero.stage + 1, 4):
            s = _variant(spec, zero={"stage": stage})
            if gb(s) <= limit_gb:
                out.append(f"zero_optimization.stage {stage}: ~{gb(s):.1f} GB")
                break
    if zero.offload_optimizer is None or zero.offload_optimizer.device != "cpu":
        from trainer.spec import OffloadConfig

        stage = max(zero.stage, 1)
        s = _variant(spec, zero={"stage": stage, "offload_optimizer": OffloadConfig(device="cpu")})
        if gb(s) <= limit_gb:
            out.append(f"zero_optimization.stage {stage} with offload_optimizer.device cpu: ~{gb(s):.1f} GB")
    if not out:
        # Shorter sequences, at micro batch 1 with checkpointing: the last resort before a bigger box.
        base = _variant(
            spec,
            gradient_checkpointing=True,
            ds={"train_batch_size": None, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": None},
        )
        seq = spec.seq_len // 2
        while seq >= 8:
            need = gb(_variant(base, seq_len=seq))
            if need <= limit_gb:
                out.append(f"seq_len {seq} with micro batch 1 and gradient_checkpointing true: ~{need:.1f} GB")
                break
            seq //= 2
    return out[:4]


@dataclass
class Memory:
    """The memory estimate of a spec that fits, where it was checked against, and the precision it assumed."""

    precision: dsconfig.Precision
    estimate: dict[str, Any]
    room: Capacity
    notes: list[str]


def check_memory(spec: JobSpec, source: ModelSource, session: Session, settings: Settings) -> Memory:
    """422 when the estimated memory per GPU (per rank on a CPU box) is more than the best box offers.

    The message gives the estimate and the nearest settings that fit. An estimate that cannot be made
    (a local model without a readable config.json) is not checked; the note says so.
    """
    room = capacity(spec, session, settings)
    precision, notes = dsconfig.resolve_precision(spec, on_gpu=room.on_gpu)
    cfg = model_config(spec, source.kind, source.name)
    estimate = estimate_memory(spec, cfg, precision)
    need = estimate["per_gpu_gb"]
    if need is not None and cfg is not None and room.per_rank_gb is not None and need > room.per_rank_gb:
        near = nearest_fits(spec, cfg, precision, room.per_rank_gb)
        hint = (
            "; settings that fit: " + "; ".join(near)
            if near
            else (
                "; nothing near fits: the model states alone are too large for this box (a box with more "
                "memory, or more GPUs with ZeRO stage 3)"
            )
        )
        raise Unprocessable(
            f"estimated memory ~{need:.1f} GB per {'GPU' if room.on_gpu else 'rank'} is more than {room.where}{hint}",
            ["body"],
            type_="does_not_fit",
        )
    if need is None:
        notes.append("memory not checked: the model's size is unknown")
    return Memory(precision, estimate, room, notes + room.notes)


@dataclass
class Admission:
    """A spec that passed every check, resolved (defaults filled in), with what the checks found out."""

    spec: JobSpec
    files: Files
    steps: int
    memory: Memory
    notes: list[str]


def admit(spec: JobSpec, settings: Settings, session: Session, user: Principal) -> Admission:
    """Every check a submission passes (403 limits; 422 files, box size, steps, memory), in that order."""
    spec, notes = with_defaults(spec, user)
    check_spec_limits(spec, user)
    files = check_files(spec, settings, session, user)
    check_fits_a_box(spec, session)
    steps = check_steps(spec, files.train)
    memory = check_memory(spec, files.source, session, settings)
    return Admission(spec, files, steps, memory, notes + memory.notes)


def data_report(spec: JobSpec, files: Files) -> dict[str, Any]:
    """The dry run's view of the data: for the training and the validation data, the format, records,
    estimated tokens, the share trained on and the examples longer than seq_len; and the split's size."""

    def stats(info: DatasetInfo, text_field: str) -> dict[str, Any]:
        train_all = trains_all(info.data_format, spec.dataset.train_on)
        s = data_stats(
            info, text_field=text_field, seq_len=spec.seq_len, train_all=train_all, overlong=spec.dataset.overlong
        )
        return {"file_format": info.format, "bytes": info.bytes, **asdict(s)}

    train = stats(files.train, spec.dataset.text_field)
    validation = stats(files.validation, spec.validation.text_field) if files.validation and spec.validation else None
    split = None
    if spec.validation_split > 0:
        held = held_out(train["records"], spec.validation_split)
        split = {
            "fraction": spec.validation_split,
            "validation_records": held,
            "train_records": train["records"] - held,
        }
    return {"train": train, "validation": validation, "split": split}


def dry_run(spec: JobSpec, settings: Settings, session: Session, user: Principal) -> dict[str, Any]:
    """Everything `POST /jobs/validate` reports about a spec that passed the checks submit runs."""
    a = admit(spec, settings, session, user)
    spec, memory, notes = a.spec, dict(a.memory.estimate), a.notes
    plan = spec.batch
    if spec.max_steps is None:
        notes.append(
            f"total steps ~{a.steps}, estimated from the dataset's size (about {BYTES_PER_TOKEN} bytes per token)"
        )
    gpu_gb = a.memory.room.gpu_gb
    fits = None
    if gpu_gb is not None and memory["per_gpu_gb"] is not None:
        fits = memory["per_gpu_gb"] <= gpu_gb * 0.95
    precision = a.memory.precision
    return {
        "world_size": plan.gpus,
        "micro_batch": plan.micro,
        "grad_accum": plan.accum,
        "train_batch_size": plan.train,
        "max_runtime_s": spec.max_runtime_s,
        "precision": precision,
        "notes": notes,
        "n_params": memory.pop("n_params", None),
        "model": {
            "kind": a.files.source.kind,
            "name": a.files.source.name if a.files.source.kind != "local" else spec.model,
        },
        "data": data_report(spec, a.files),
        "deepspeed_config": dsconfig.build_ds_config(spec, precision=precision, steps=a.steps),
        "memory": {**memory, "gpu_memory_gb": round(gpu_gb, 2) if gpu_gb else None, "fits": fits},
        "queue_position": queue_position_for(session, priority=spec.priority),
    }


def reschedule(session: Session, dispatch: Dispatch | None, settings: Settings, after: str) -> None:
    """A scheduling pass after a change the caller committed; a failure is logged (the sweep places the jobs)."""
    try:
        schedule(session, dispatch, box_ttl_s=settings.box_ttl_s, max_gpus_per_user=settings.max_gpus_per_user)
    except Exception:
        log.exception("scheduling after %s failed", after)
