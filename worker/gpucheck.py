"""Foreign processes on this box's GPUs (NVML): a GPU someone uses outside trainbox is not launched on.

Before a launch, the job's assigned GPUs must be free of processes: the job's own ranks do not exist
yet, and trainbox frees a GPU only after its job's processes are gone, so anything found there is
foreign (another user's notebook, a leaked process). The job then goes back to `queued` with the same
attempt (nothing ran), the busy GPUs are flagged (GET /gpus shows them) and the scheduler places it on
others. The sweep clears the flag once a free GPU has no process left. On CPU boxes this is a no-op.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence

from sqlalchemy import select, update

from core import lifecycle
from core.db import session_scope
from core.events import settings_publisher
from core.models import Gpu, Job
from core.states import JobState
from trainer.hardware import nvml

log = logging.getLogger(__name__)

Processes = Mapping[int, Sequence[int]]  # GPU index -> pids of the processes using it


def nvml_processes() -> dict[int, list[int]] | None:
    """GPU index -> pids of compute and graphics processes on it; None where there is no NVML (CPU box)."""
    with nvml() as pynvml:
        if pynvml is None:
            return None
        out: dict[int, list[int]] = {}
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            procs = [
                *pynvml.nvmlDeviceGetComputeRunningProcesses(handle),
                *pynvml.nvmlDeviceGetGraphicsRunningProcesses(handle),
            ]
            out[index] = sorted({int(p.pid) for p in procs})
        return out


def busy_indices(indices: Iterable[int], processes: Processes | None, own_pids: Iterable[int] = ()) -> list[int]:
    """The GPUs among `indices` that a process other than `own_pids` uses ([] without NVML)."""
    if processes is None:
        return []
    own = set(own_pids)
    return sorted(i for i in set(indices) if any(pid not in own for pid in processes.get(i, ())))


def _gpu_box(session: object, box: str | None) -> bool:
    names = session.scalars(select(Gpu.name).where(Gpu.box == box)).all()  # type: ignore[attr-defined]
    return bool(names) and not all(n.startswith("cpu") for n in names)


def requeue_if_busy(job_id: str, attempt: int, processes: Processes | None = None) -> list[int]:
    """Before a launch: if any assigned GPU is busy, flag it, free the job's GPUs and put the job back
    in the queue (same attempt); returns the busy GPUs ([]: go ahead). `processes`: injected in tests."""
    with session_scope() as session:
        row = session.execute(
            select(Job.box, Job.gpu_ids, Job.state, Job.attempt).where(Job.id == job_id)
        ).one_or_none()
        if row is None or row.state != JobState.STARTING.value or row.attempt != attempt:
            return []  # not ours to launch: the claim decides what happens
        if not _gpu_box(session, row.box):
            return []  # CPU slots: nothing to check
        procs = nvml_processes() if processes is None else processes
        busy = busy_indices(row.gpu_ids or [], procs, own_pids=[os.getpid()])
        if not busy:
            return []
        event = lifecycle.requeue(
            session, job_id, attempt=attempt, from_states=[JobState.STARTING], next_attempt=False, busy_gpus=busy
        )
        if event is None:
            return []
        session.execute(
            update(Gpu)
            .where(Gpu.box == row.box, Gpu.index.in_(busy))
            .values(busy=True)
            .execution_options(synchronize_session=False)
        )
    log.warning(
        "job %s attempt %s: GPUs %s of box %s are used by other processes; requeued", job_id, attempt, busy, row.box
    )
    settings_publisher()(job_id, event)
    return busy


def refresh_busy(box: str, processes: Processes | None = None) -> None:
    """The sweep's part: flag or clear `busy` on the box's free GPUs from what NVML sees now."""
    procs = nvml_processes() if processes is None else processes
    if procs is None:
        return
    with session_scope() as session:
        if not _gpu_box(session, box):
            return
        free = session.scalars(select(Gpu.index).where(Gpu.box == box, Gpu.job_id.is_(None))).all()
        busy = set(busy_indices(free, procs, own_pids=[os.getpid()]))
        for index in free:
            session.execute(
                update(Gpu)
                .where(Gpu.box == box, Gpu.index == index, Gpu.job_id.is_(None))
                .values(busy=index in busy)
                .execution_options(synchronize_session=False)
            )
