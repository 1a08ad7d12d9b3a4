"""This box: what it offers (GPUs via NVML, else CPU slots), its registration, and the periodic sweep."""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from redis import Redis
from sqlalchemy import select

from core.db import session_scope
from core.keys import box_queue
from core.models import Job, utcnow
from core.scheduler import GpuInfo, heartbeat_box, register_box, report_gpu_memory
from core.settings import get_settings
from core.states import JobState
from trainer.hardware import nvml
from worker import retention
from worker.gpucheck import refresh_busy
from worker.reaper import reap_expired, reap_orphans
from worker.runner import reschedule, shutting_down

log = logging.getLogger(__name__)

CPU_SLOT_NAME = "cpu-slot"


def detect_gpus() -> list[GpuInfo]:
    """The box's GPUs from NVML; an empty list when there is no driver or no GPU."""
    with nvml() as pynvml:
        if pynvml is None:
            return []
        out = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            out.append(GpuInfo(index=index, name=str(name), memory_mb=int(memory.total // (1 << 20))))
        return out


def box_devices() -> list[GpuInfo]:
    """What this box offers: its GPUs, or `cpu_slots` CPU slots when it has none."""
    gpus = detect_gpus()
    if gpus:
        return gpus
    return [GpuInfo(index=i, name=CPU_SLOT_NAME, memory_mb=None) for i in range(get_settings().cpu_slots)]


def box_accelerator(devices: list[GpuInfo]) -> str:
    """What the box's ranks run on: "cpu" for CPU slots, else "cuda" (as build_launch decides per job)."""
    return "cpu" if devices and all(d.name.startswith("cpu") for d in devices) else "cuda"


def register(devices: list[GpuInfo]) -> str:
    """Register (or refresh) this box and its devices; returns the box name."""
    name = get_settings().box_name
    with session_scope() as session:
        register_box(session, name, devices)
    log.info("box %s registered with %d %s", name, len(devices), devices[0].name if devices else "devices")
    return name


def resend_stale_starting(box: str, older_than_s: float) -> int:
    """Re-send `run_job` for jobs stuck in `starting` here (a lost message, or a crash before enqueue),
    and for jobs cancelled while starting that no worker claimed (the task then ends them)."""
    from worker.celery_app import dispatch

    cutoff = utcnow() - timedelta(seconds=older_than_s)
    unclaimed = (Job.state == JobState.STARTING.value) | (
        (Job.state == JobState.CANCELLING.value) & Job.lease_owner.is_(None)
    )
    with session_scope() as session:
        stale = session.execute(
            select(Job.id, Job.attempt, Job.box).where(unclaimed, Job.box == box, Job.updated_at < cutoff)
        ).all()
    for job_id, attempt, _ in stale:
        log.warning("job %s attempt %s has been starting since before %s; re-sending", job_id, attempt, cutoff)
        dispatch(job_id, attempt, box_queue(box))
    return len(stale)


def gpu_memory_used() -> dict[int, int]:
    """GPU index -> MB in use (NVML); empty on a box without GPUs."""
    with nvml() as pynvml:
        if pynvml is None:
            return {}
        return {
            i: int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).used // (1 << 20))
            for i in range(pynvml.nvmlDeviceGetCount())
        }


def sweep(box: str) -> None:
    """One sweep: the box is alive (GPU memory in use, busy GPUs flagged), stale `starting` re-sent, schedule;
    hourly, finished jobs' checkpoints past the retention deleted."""
    settings = get_settings()
    used = gpu_memory_used()
    with session_scope() as session:
        heartbeat_box(session, box)
        report_gpu_memory(session, box, used)
    refresh_busy(box)
    resend_stale_starting(box, older_than_s=max(settings.sweep_interval_s, settings.lease_s))
    redis = Redis.from_url(settings.redis_url) if settings.redis_url else None
    try:
        reap_orphans(box, redis)  # a dead worker's jobs at once; others' when their lease expires
        reap_expired(redis)
    finally:
        if redis is not None:
            redis.close()
    reschedule()
    try:
        retention.maybe_prune()  # last: a slow disk must not hold up placing jobs
    except Exception:
        log.exception("checkpoint retention failed; it is tried again in an hour")


class Sweeper(threading.Thread):
    """Runs `sweep` every sweep_interval_s in the worker process until stopped."""

    def __init__(self, box: str, interval_s: float | None = None) -> None:
        super().__init__(name="trainbox-sweep", daemon=True)
        self.box = box
        self.interval_s = interval_s or get_settings().sweep_interval_s
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set() and not shutting_down.is_set():
            try:
                sweep(self.box)
            except Exception:
                log.exception("sweep failed; retrying in %.0fs", self.interval_s)
            self.stopped.wait(self.interval_s)

    def stop(self) -> None:
        self.stopped.set()
