"""The box view (GPUs), health, Prometheus metrics and the dashboard page."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import select, text
from sqlalchemy.orm import selectinload
from starlette.concurrency import run_in_threadpool

from api.dashboard import DASHBOARD_HTML
from api.deps import SessionDep
from api.schemas import BoxRead, GpuRead, GpuView
from core.models import Box, Job

log = logging.getLogger(__name__)
router = APIRouter(tags=["system"])


@router.get("/gpus", response_model=GpuView)
def list_gpus(session: SessionDep) -> GpuView:
    """Every box, its GPUs (or CPU slots), and the job holding each."""
    boxes = session.scalars(select(Box).options(selectinload(Box.gpus)).order_by(Box.name)).all()
    held = {g.job_id for b in boxes for g in b.gpus if g.job_id}
    jobs = {j.id: j for j in session.scalars(select(Job).where(Job.id.in_(held)))} if held else {}
    data = []
    for box in boxes:
        gpus = []
        for g in box.gpus:
            job = jobs.get(g.job_id) if g.job_id else None
            holder = {"id": job.id, "name": job.name, "owner": job.owner, "state": job.state} if job else None
            gpus.append(
                GpuRead(
                    index=g.index,
                    name=g.name,
                    memory_mb=g.memory_mb,
                    memory_used_mb=g.memory_used_mb,
                    job=holder,
                )
            )
        data.append(BoxRead(name=box.name, queue=box.queue, heartbeat_at=box.heartbeat_at, gpus=gpus))
    total = sum(len(b.gpus) for b in data)
    return GpuView(data=data, total=total, in_use=sum(1 for b in data for g in b.gpus if g.job))


def _check_db(request: Request) -> None:
    with request.app.state.read_sessions() as session:
        session.execute(text("SELECT 1"))


@router.get("/healthz")
async def healthz(request: Request) -> JSONResponse:
    """Liveness with database and Redis checks; 503 when either is down."""
    checks: dict[str, str] = {}
    try:
        await asyncio.wait_for(run_in_threadpool(_check_db, request), timeout=5)
        checks["database"] = "ok"
    except Exception as e:
        log.warning("health: database check failed: %s", e)
        checks["database"] = f"error: {type(e).__name__}"
    redis = request.app.state.redis
    if redis is None:
        checks["redis"] = "not configured"
    else:
        try:
            await asyncio.wait_for(redis.ping(), timeout=2)
            checks["redis"] = "ok"
        except Exception as e:
            log.warning("health: redis check failed: %s", e)
            checks["redis"] = f"error: {type(e).__name__}"
    healthy = all(v in ("ok", "not configured") for v in checks.values())
    return JSONResponse({"status": "ok" if healthy else "unavailable", **checks}, status_code=200 if healthy else 503)


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    """Prometheus exposition: jobs by state, GPUs in use, HTTP requests."""
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def dashboard() -> HTMLResponse:
    """The dashboard: queue, jobs, live loss chart."""
    return HTMLResponse(DASHBOARD_HTML)
