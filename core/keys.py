"""Every Redis key, Celery queue and Celery task name trainbox uses, in one place."""

from __future__ import annotations

# Celery task names (the worker registers its tasks under these names; the API sends by name).
RUN_JOB_TASK = "worker.tasks.run_job"


def box_queue(box: str) -> str:
    """The Celery queue a box's worker consumes; `run_job` for jobs placed on that box goes here."""
    return f"trainbox.box.{box}"


def job_events(job_id: str) -> str:
    """The job's event stream (XADD by the relay, XREAD by the SSE endpoint); one field, `data`."""
    return f"job:{job_id}:events"


def job_relay_offsets(job_id: str) -> str:
    """Hash: how far the worker's relay has read each file of the job's run dir (a later attempt
    resumes there: nothing lost, nothing repeated)."""
    return f"job:{job_id}:relay"


def submit_rate(user: str, window: int) -> str:
    """Counter of a user's POST /jobs in one rate-limit window (a minute; expires with it)."""
    return f"trainbox:rate:submit:{user}:{window}"


EVENT_FIELD = "data"
