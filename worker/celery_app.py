"""The Celery app: Redis is the doorbell, the database is the truth.

Messages are acknowledged when received and prefetch is off, so the broker never re-delivers a
multi-day run and no idle slot holds a message another could run; duplicate deliveries and lost
workers are handled by the compare-and-set claim, the lease and the sweep.
"""

from __future__ import annotations

from functools import lru_cache

from celery import Celery

from core.dispatch import celery_dispatcher
from core.scheduler import Dispatch
from core.settings import get_settings


def broker_url() -> str:
    """The Redis URL from settings; a worker cannot start without one."""
    url = get_settings().redis_url
    if not url:
        raise RuntimeError(
            "TRAINBOX_REDIS_URL is not set: point it at a Redis server, or use `trainbox up`, which starts one"
        )
    return url


def make_app() -> Celery:
    """Build the Celery app (broker read from settings when the app first connects)."""
    celery = Celery("trainbox", include=["worker.tasks"])
    celery.conf.update(
        broker_url=get_settings().redis_url or "redis://127.0.0.1:6379/0",
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        result_backend=None,
        task_ignore_result=True,
        task_acks_late=False,
        task_reject_on_worker_lost=False,
        worker_prefetch_multiplier=1,
        worker_disable_prefetch=True,
        worker_hijack_root_logger=False,
        task_create_missing_queues=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"socket_keepalive": True},
        worker_send_task_events=False,
        task_send_sent_event=False,
        enable_utc=True,
    )
    return celery


app = make_app()


@lru_cache(maxsize=1)
def _producer() -> Dispatch:
    return celery_dispatcher(broker_url())


def dispatch(job_id: str, attempt: int, queue: str) -> None:
    """Ring the doorbell: ask the box behind `queue` to run this attempt of the job (the API's producer)."""
    _producer()(job_id, attempt, queue)
