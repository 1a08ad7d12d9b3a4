"""A job's progress read back from its cached fields: step, total, fraction and an ETA.

The worker stores the fields (step, total_steps, epoch, latest, and optionally rate_origin =
{"step", "time"} at the first step it saw in this attempt); this module only reads them.
"""

from __future__ import annotations

import time
from typing import Any

from core.models import Job
from trainer.events import EVAL_METRIC_FIELDS, STEP_METRIC_FIELDS

# jobs.latest: the newest step's stored fields (its `time` besides), and the newest eval loss.
LATEST_FIELDS = (*(f for f in STEP_METRIC_FIELDS if f != "time"), *EVAL_METRIC_FIELDS)


def _rate_origin(job: Job) -> tuple[int, float] | None:
    origin = job.rate_origin
    if origin and origin.get("time") is not None and origin.get("step") is not None:
        return int(origin["step"]), float(origin["time"])
    if job.started_at is not None and job.attempt == 1:
        # Counts start-up time as training time: an ETA on the safe side.
        return 0, job.started_at.timestamp()
    return None


def progress_of(job: Job, now: float | None = None) -> dict[str, Any]:
    """{step, total_steps, epoch, fraction, eta_s}; unknowns are None."""
    step, total = job.step, job.total_steps
    fraction = min(1.0, step / total) if step is not None and total else None
    eta = None
    latest = job.latest or {}
    origin = _rate_origin(job)
    if job.state == "succeeded":
        eta = 0.0
        fraction = 1.0 if total else fraction
    elif job.state == "running" and step is not None and total and origin and latest.get("time"):
        done = step - origin[0]
        elapsed = float(latest["time"]) - origin[1]
        if done > 0 and elapsed > 0:
            remaining = max(0, total - step) * elapsed / done
            since_latest = max(0.0, (now or time.time()) - float(latest["time"]))
            eta = round(max(0.0, remaining - since_latest), 1)
    return {"step": step, "total_steps": total, "epoch": job.epoch, "fraction": fraction, "eta_s": eta}
