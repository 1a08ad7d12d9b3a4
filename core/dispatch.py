"""Sending `run_job` to a box's Celery queue by task name (the API does not import the worker)."""

from __future__ import annotations

import logging
from typing import Any

from core import keys
from core.scheduler import Dispatch

log = logging.getLogger(__name__)


def celery_dispatcher(redis_url: str) -> Dispatch:
    """A dispatch callable for `schedule()` that publishes run_job(job_id, attempt) over Redis."""
    from celery import Celery

    producer = Celery("trainbox-dispatch", broker=redis_url, set_as_current=False)
    producer.conf.update(task_serializer="json", accept_content=["json"], broker_connection_retry=False)
    retry: dict[str, Any] = {
        "max_retries": 2,
        "interval_start": 0.1,
        "interval_step": 0.2,
        "interval_max": 0.5,
    }

    def dispatch(job_id: str, attempt: int, queue: str) -> None:
        producer.send_task(keys.RUN_JOB_TASK, args=[job_id, attempt], queue=queue, retry=True, retry_policy=retry)
        log.info("sent run_job(%s, %s) to %s", job_id, attempt, queue)

    return dispatch
