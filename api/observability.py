"""Prometheus metrics: request counts and latencies (middleware), jobs and GPUs (read at scrape time)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.models import Gpu, Job
from core.states import JobState

log = logging.getLogger(__name__)


class StateCollector(Collector):
    """Jobs by state and GPUs in use, counted in the database when Prometheus scrapes."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def collect(self) -> Iterator[Any]:
        jobs = GaugeMetricFamily("trainbox_jobs", "Jobs by state", labels=["state"])
        gpus = GaugeMetricFamily("trainbox_gpus", "GPUs (or CPU slots) by use", labels=["use"])
        try:
            with self.sessions() as session:
                counts = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
                total = session.scalar(select(func.count()).select_from(Gpu)) or 0
                used = session.scalar(select(func.count()).select_from(Gpu).where(Gpu.job_id.is_not(None))) or 0
        except SQLAlchemyError as e:
            # A scrape must not fail because the DB is away: the HTTP metrics still report.
            log.warning("metrics: database unavailable: %s", e)
            return
        for state in JobState:
            jobs.add_metric([state.value], counts.get(state.value, 0))
        gpus.add_metric(["in_use"], used)
        gpus.add_metric(["free"], total - used)
        yield jobs
        yield gpus


def make_registry(sessions: sessionmaker[Session]) -> tuple[CollectorRegistry, Counter, Histogram]:
    """A registry per app (tests build several apps in one process)."""
    registry = CollectorRegistry()
    requests = Counter("trainbox_http_requests", "HTTP requests", ["method", "route", "status"], registry=registry)
    latency = Histogram(
        "trainbox_http_request_seconds",
        "Time to the response start",
        ["method", "route"],
        registry=registry,
        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
    )
    registry.register(StateCollector(sessions))
    return registry, requests, latency


class MetricsMiddleware:
    """Counts requests by route template (not raw path: ids would explode the label set)."""

    def __init__(self, app: ASGIApp, *, requests: Counter, latency: Histogram) -> None:
        self.app, self.requests, self.latency = app, requests, latency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        timed = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, timed
            if message["type"] == "http.response.start":
                status = message["status"]
                if not timed:
                    timed = True
                    self.latency.labels(scope["method"], _route(scope)).observe(time.perf_counter() - start)
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.requests.labels(scope["method"], _route(scope), str(status)).inc()


def _route(scope: Scope) -> str:
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"
