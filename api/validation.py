"""Checks a spec needs beyond its own fields: files under the roots, and the validate dry run."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.errors import Unprocessable
from api.estimate import estimate_memory, model_config
from api.limits import check_spec_limits
from core.models import Dataset, Gpu
from core.scheduler import queue_position_for
from core.settings import Settings
from core.users import Principal
from trainer import dsconfig
from trainer.paths import DatasetInfo, ModelSource, SpecError, inspect_dataset, resolve_dataset, resolve_model
from trainer.spec import JobSpec

# Lines of the dataset read at submission: enough to catch a wrong format or text field early.
INSPECT_RECORDS = 200


def check_files(
    spec: JobSpec, settings: Settings, session: Session, user: Principal
) -> tuple[ModelSource, DatasetInfo]:
    """The model and dataset the spec names, resolved under their roots; 422 naming the field if not.

    An uploaded dataset (`{"id": ...}`) may be used by its owner only; to anyone else it does not exist.
    """
    assert settings.model_root is not None and settings.data_root is not None
    if spec.dataset.id is not None:
        # Held shared until the job is committed: DELETE /datasets/{id} (FOR UPDATE) waits for it.
        row = session.get(Dataset, spec.dataset.id, with_for_update={"read": True})
        if row is None or row.owner != user.name:
            raise Unprocessable(f"no uploaded dataset with id {spec.dataset.id!r}", ["body", "dataset", "id"])
    try:
        source = resolve_model(spec.model, settings.model_root)
        path = resolve_dataset(spec.dataset, settings.data_root)
        info = inspect_dataset(path, spec.dataset, max_records=INSPECT_RECORDS)
    except SpecError as e:
        loc: list[str | int] = ["body", *e.field.split(".")] if e.field else ["body"]
        raise Unprocessable(str(e), loc) from None
    return source, info


def box_sizes(session: Session) -> dict[str, list[int | None]]:
    """box -> memory (MB) of each of its GPUs (None for CPU slots)."""
    out: dict[str, list[int | None]] = {}
    for box, memory in session.execute(select(Gpu.box, Gpu.memory_mb).order_by(Gpu.box, Gpu.index)):
        out.setdefault(box, []).append(memory)
    return out


def check_fits_a_box(spec: JobSpec, session: Session) -> None:
    """422 when boxes are registered and none has as many GPUs as the spec asks for."""
    sizes = box_sizes(session)
    if sizes and spec.gpus > max(len(v) for v in sizes.values()):
        biggest = max(len(v) for v in sizes.values())
        raise Unprocessable(
            f"gpus {spec.gpus} is more than any box has (the largest has {biggest}); a job runs on one box",
            ["body", "gpus"],
        )


def dry_run(spec: JobSpec, settings: Settings, session: Session, user: Principal) -> dict[str, Any]:
    """Everything `POST /jobs/validate` reports about a spec that passed the checks (limits included)."""
    check_spec_limits(spec, user)
    source, info = check_files(spec, settings, session, user)
    check_fits_a_box(spec, session)
    sizes = box_sizes(session)
    candidates = [mem for mem in sizes.values() if len(mem) >= spec.gpus]
    on_gpu = not sizes or any(m is not None for mems in candidates for m in mems)
    precision, notes = dsconfig.resolve_precision(spec, on_gpu=on_gpu)
    plan = spec.batch
    if spec.max_steps is not None:
        steps = spec.max_steps
    else:
        # Without tokenizing: ~4 bytes of text per token, packed into seq_len blocks.
        blocks = max(1, info.bytes // 4 // spec.seq_len)
        steps = spec.epochs * max(1, blocks // plan.train)
        notes.append(f"total steps ~{steps}, estimated from the dataset's size (about 4 bytes per token)")
    cfg = model_config(spec, source.kind, source.name)
    memory = estimate_memory(spec, cfg, precision)
    box_memory = [min(mems) for mems in candidates if all(m is not None for m in mems)]
    gpu_gb = max(box_memory) / 1024 if box_memory else None
    fits = None
    if gpu_gb is not None and memory["per_gpu_gb"] is not None:
        fits = memory["per_gpu_gb"] <= gpu_gb * 0.95
    return {
        "world_size": plan.gpus,
        "micro_batch": plan.micro,
        "grad_accum": plan.accum,
        "train_batch_size": plan.train,
        "precision": precision,
        "notes": notes,
        "n_params": memory.pop("n_params", None),
        "model": {"kind": source.kind, "name": source.name if source.kind != "local" else spec.model},
        "dataset": {"format": info.format, "bytes": info.bytes, "records_checked": info.records},
        "deepspeed_config": dsconfig.build_ds_config(spec, precision=precision, steps=steps),
        "memory": {**memory, "gpu_memory_gb": round(gpu_gb, 2) if gpu_gb else None, "fits": fits},
        "queue_position": queue_position_for(session, priority=spec.priority),
    }


def schedule_options(settings: Settings) -> dict[str, Any]:
    """The keyword arguments the API passes to core.scheduler.schedule."""
    return {"ports": settings.ports, "box_ttl_s": settings.box_ttl_s, "max_gpus_per_user": settings.max_gpus_per_user}
