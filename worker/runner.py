"""One attempt of a job, from claim to terminal state: the body of the `run_job` task.

claim (starting -> running by compare-and-set, with a lease) -> supervise the trainer while the
tick relays events, renews the lease and watches for cancel -> terminal state by compare-and-set,
GPUs freed (only after the processes are gone) -> scheduler.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from datetime import timedelta
from typing import Any

from redis import Redis
from redis.exceptions import RedisError
from sqlalchemy import select, update

from core import keys, lifecycle
from core.db import session_scope
from core.events import settings_publisher
from core.models import Gpu, Job, utcnow
from core.scheduler import schedule
from core.settings import get_settings
from core.states import JobState
from trainer.events import ErrorType
from worker.gpucheck import requeue_if_busy
from worker.metrics import backfill_metrics, store_metrics
from worker.relay import Relay
from worker.supervisor import Launch, Outcome, Stop, supervise

log = logging.getLogger(__name__)

CHECK_S = 0.5  # how often the tick reads the job's row for a cancel or a lost lease
# Set when the worker is shutting down: running jobs checkpoint and go back to the queue.
shutting_down = threading.Event()


def lease_owner() -> str:
    """Who holds a lease: this worker process and thread."""
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


def claim(job_id: str, attempt: int) -> dict[str, Any] | None:
    """starting -> running for this attempt, and its event; None means a duplicate delivery, a stale
    attempt or a cancel."""
    with session_scope() as session:
        return lifecycle.start(
            session, job_id, attempt=attempt, lease_owner=lease_owner(), lease_s=get_settings().lease_s
        )


def build_launch(job_id: str, attempt: int) -> Launch:
    """The trainer launch for the job's current placement."""
    settings = get_settings()
    with session_scope() as session:
        job = session.get_one(Job, job_id)
        devices = list(job.gpu_ids or [])
        box_gpus = session.scalars(select(Gpu).where(Gpu.box == job.box)).all()
        cpu_box = bool(box_gpus) and all(g.name.startswith("cpu") for g in box_gpus)
        spec, slots = dict(job.spec), max(1, len(box_gpus))
    # OMP_NUM_THREADS is per rank, and each CPU slot runs one rank: a slot's share of the cores.
    # (More threads than cores makes gloo ranks spin against each other, several times slower.)
    threads = max(1, (os.cpu_count() or 1) // slots) if cpu_box else None
    return Launch(
        job_id=job_id,
        attempt=attempt,
        spec=spec,
        run_dir=settings.run_dir(job_id),
        devices=devices,
        accelerator="cpu" if cpu_box else "cuda",
        model_root=settings.model_root,  # type: ignore[arg-type]
        data_root=settings.data_root,  # type: ignore[arg-type]
        max_runtime_s=spec.get("max_runtime_s"),
        cancel_grace_s=settings.cancel_grace_s,
        start_timeout_s=settings.start_timeout_s,
        extensions_dir=settings.extensions_dir,
        cpu_threads=threads,
        token_cache_bytes=settings.token_cache_bytes,
    )


class Tick:
    """Called by the supervisor every poll: relay, renew the lease, report cancel/lost/shutdown."""

    def __init__(self, job_id: str, attempt: int, relay: Relay) -> None:
        self.job_id, self.attempt, self.relay = job_id, attempt, relay
        self.settings = get_settings()
        self.next_check = 0.0
        self.next_heartbeat = time.monotonic() + self.settings.heartbeat_s
        self.renewed_at = time.monotonic()
        self.reason: Stop | None = None
        self.cancelling: dict[str, Any] | None = None  # the cancelling event this worker is to publish

    def __call__(self) -> Stop | None:
        self.relay.pump()
        now = time.monotonic()
        if shutting_down.is_set() and self.reason is None:
            self.reason = Stop.SHUTDOWN
        if now - self.renewed_at > self.settings.lease_s:
            # The lease ran out without a renewal (the DB is unreachable): the reaper will hand the job
            # to another attempt, so this one must stop rather than train on, unowned.
            self.reason = Stop.LOST
        if now >= self.next_check:
            self.next_check = now + CHECK_S
            try:
                self._check(now)
            except Exception as exc:  # the DB is away: keep training, the lease decides later
                log.warning("job %s: could not check its row: %s", self.job_id, exc)
        return self.reason

    def _check(self, now: float) -> None:
        with session_scope() as session:
            row = session.execute(
                select(Job.state, Job.attempt, Job.cancel_requested, Job.paused_at).where(Job.id == self.job_id)
            ).one_or_none()
            if row is None or row.attempt != self.attempt or row.state not in (JobState.RUNNING, JobState.CANCELLING):
                self.reason = Stop.LOST  # fenced: another attempt (or nobody) owns the job now
                return
            if row.state == JobState.CANCELLING or row.cancel_requested:
                # The API moves the job to `cancelling` (and says so on the stream); a bare flag is
                # moved here, and then this worker says so.
                if row.state == JobState.RUNNING:
                    self.cancelling = lifecycle.cancel(session, self.job_id, attempt=self.attempt)
                if self.reason is None:
                    self.reason = Stop.CANCEL
            elif row.paused_at is not None and self.reason is None:
                # Paused: the worker's own going-away path (checkpoint, back to the queue, where the
                # scheduler leaves it until it is resumed).
                self.reason = Stop.SHUTDOWN
            if now >= self.next_heartbeat:
                self.next_heartbeat = now + self.settings.heartbeat_s
                renewed = session.execute(
                    update(Job)
                    .where(Job.id == self.job_id, Job.attempt == self.attempt)
                    .values(lease_expires_at=utcnow() + timedelta(seconds=self.settings.lease_s))
                    .execution_options(synchronize_session=False)
                ).rowcount
                if not renewed:
                    self.reason = Stop.LOST
                else:
                    self.renewed_at = now
        if self.cancelling is not None:
            self.relay.publish([{"time": time.time(), **self.cancelling}])
            self.cancelling = None


def make_sink(job_id: str, attempt: int) -> Any:
    """The relay's metric sink: one transaction per batch, fenced by the attempt."""
    origin_set = False

    def sink(steps: list[dict[str, Any]], fields: dict[str, Any]) -> None:
        nonlocal origin_set
        fields = dict(fields)
        first = next((e for e in steps if e.get("type") != "eval"), None)
        if first is not None and not origin_set:
            fields["rate_origin"] = {"step": int(first["step"]), "time": float(first["time"])}
        with session_scope() as session:
            store_metrics(session, job_id=job_id, attempt=attempt, steps=steps, fields=fields)
        origin_set = origin_set or first is not None

    return sink


def finish(job_id: str, attempt: int, outcome: Outcome) -> dict[str, Any] | None:
    """Record the attempt's end (the processes are gone); return its `state` event (None: fenced)."""
    if outcome.kind == "lost":
        return None  # another attempt owns the job: write nothing
    with session_scope() as session:
        to = {"succeeded": JobState.SUCCEEDED, "cancelled": JobState.CANCELLED}.get(outcome.kind, JobState.FAILED)
        error = outcome.error
        if outcome.kind == "preempted":
            job = session.get_one(Job, job_id)
            if job.attempt < job.max_attempts:
                # The worker is going away: back to the queue; the next attempt resumes from the checkpoint.
                event = lifecycle.requeue(session, job_id, attempt=attempt, from_states=[JobState.RUNNING])
                return _fenced(event, job_id, attempt, JobState.QUEUED)
            error = {
                "type": ErrorType.LOST,
                "message": f"preempted on its last attempt ({attempt} of {job.max_attempts})",
            }
        event = lifecycle.finish(
            session, job_id, attempt=attempt, to=to, error=error if to is JobState.FAILED else None
        )
        return _fenced(event, job_id, attempt, to)


def _fenced(event: dict[str, Any] | None, job_id: str, attempt: int, to: JobState) -> dict[str, Any] | None:
    if event is None:
        log.warning("job %s attempt %s: could not record %s (the job moved on)", job_id, attempt, to)
    return event


def cancel_unstarted(job_id: str, attempt: int) -> bool:
    """A cancel that came while the job was `starting`: nothing runs, so end it and free its GPUs."""
    with session_scope() as session:
        if session.scalar(select(Job.lease_owner).where(Job.id == job_id)) is not None:
            return False  # a supervisor holds it and will finish the cancel
        event = lifecycle.cancel(session, job_id, attempt=attempt, stopped=True)
    if event is not None:
        settings_publisher()(job_id, event)
    return event is not None


def run_attempt(job_id: str, attempt: int) -> str:
    """Claim, run and finish one attempt of a job; returns what happened (for logs and tests)."""
    if requeue_if_busy(job_id, attempt):  # a GPU used outside trainbox: back to the queue, not launched
        reschedule()
        return "requeued"
    started = claim(job_id, attempt)
    if started is None:
        if cancel_unstarted(job_id, attempt):
            reschedule()
            return "cancelled"
        log.info("job %s attempt %s: not claimed (duplicate delivery, stale attempt or cancelled)", job_id, attempt)
        return "skipped"
    settings = get_settings()
    redis = Redis.from_url(settings.redis_url or "redis://127.0.0.1:6379/0")
    relay = Relay(
        run_dir=settings.run_dir(job_id),
        job_id=job_id,
        redis=redis,
        sink=make_sink(job_id, attempt),
        stream_cap=settings.stream_maxlen,
        offsets_key=keys.job_relay_offsets(job_id),
    )
    try:
        if attempt > 1:
            relay.pump(final=True)  # what the last attempt's relay never got to (its worker died)
            with session_scope() as session:
                backfill_metrics(session, job_id=job_id, attempt=attempt, events_path=relay.events.path)
        relay.publish([{"time": time.time(), **started}])
        launch = build_launch(job_id, attempt)
        outcome = supervise(launch, Tick(job_id, attempt, relay))
    except Exception as exc:
        # Nothing may leave a job `running` forever: a failure of the worker itself fails the job.
        log.exception("job %s attempt %s: supervisor error", job_id, attempt)
        error = {"type": ErrorType.LAUNCH_ERROR, "message": f"worker error: {exc!r}", "log_tail": ""}
        outcome = Outcome("failed", None, error)
    relay.measure_disk()  # the attempt's last word on the job's size, stored with the final flush
    relay.pump(final=True)
    event = _retry(lambda: finish(job_id, attempt, outcome), what=f"recording the end of job {job_id}")
    state = None if event is None else event["state"]
    if event is not None:
        relay.publish([{"time": time.time(), **event}])
    if not relay.drain():
        log.warning("job %s: Redis stayed away; %d events were not streamed", job_id, len(relay._backlog))
    if state is not None and JobState(state).is_terminal():
        with contextlib.suppress(RedisError):
            redis.delete(keys.job_relay_offsets(job_id))
    redis.close()
    if not shutting_down.is_set():  # a box going away must not be handed the job straight back
        reschedule()
    return state or "lost"


def _retry(fn: Any, *, what: str, tries: int = 10, wait_s: float = 2.0) -> Any:
    """A database blip at the end of a run must not leave the job to the reaper (and a rerun)."""
    for i in range(tries):
        try:
            return fn()
        except Exception:
            if i == tries - 1:
                raise
            log.warning("%s failed; retrying in %.0fs", what, wait_s, exc_info=True)
            time.sleep(wait_s)


def reschedule() -> None:
    """Give freed GPUs to the queue (only live boxes get work)."""
    from worker.celery_app import dispatch

    try:
        with session_scope() as session:
            schedule(session, lifecycle.announcing(dispatch, settings_publisher()), box_ttl_s=get_settings().box_ttl_s)
    except Exception:
        log.exception("scheduler call failed; the sweep will retry")
