"""Celery tasks. They take a job id and an attempt, never an ORM object; the database says what to do."""

from __future__ import annotations

from core import keys
from worker.celery_app import app
from worker.runner import run_attempt


@app.task(name=keys.RUN_JOB_TASK, ignore_result=True)
def run_job(job_id: str, attempt: int) -> str:
    """Run one attempt of a job on this box (a duplicate or stale delivery does nothing)."""
    return run_attempt(job_id, attempt)
