"""The box view (GPUs), health, Prometheus metrics and the dashboard page."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import select, text
from sqlalchemy.orm import selectinload

from api.dashboard import DASHBOARD_HTML
from api.deps import BearerDep, CurrentUser, SessionDep, current_user
from api.errors import documented
from api.schemas import BoxRead, GpuRead, GpuView, QueueEntry, QueueView
from core.models import Box, Gpu, Job
from core.queue import start_eta_s
from core.scheduler import queued_order
from core.states import ACTIVE_STATES
from core.users import Principal

log = logging.getLogger(__name__)
router = APIRouter(tags=["system"])


def public_job(job: Job, user: Principal) -> dict[str, object]:
    """What everyone may see of any job: name, owner, state; the id only to those who may open it."""
    return {"id": job.id if user.can_see(job.owner) else None, "name": job.name, "owner": job.owner, "state": job.state}


@router.get("/gpus", response_model=GpuView, responses=documented(401))
def list_gpus(session: SessionDep, user: CurrentUser) -> GpuView:
    """Every box, its GPUs (or CPU slots), and the job holding each (name, owner, state)."""
    boxes = session.scalars(select(Box).options(selectinload(Box.gpus)).order_by(Box.name)).all()
    held = {g.job_id for b in boxes for g in b.gpus if g.job_id}
    jobs = {j.id: j for j in session.scalars(select(Job).where(Job.id.in_(held)))} if held else {}

    def read(g: Gpu) -> GpuRead:
        holder = jobs.get(g.job_id) if g.job_id else None
        columns = {name: getattr(g, name) for name in GpuRead.model_fields if name != "job"}
        return GpuRead(**columns, job=public_job(holder, user) if holder else None)

    data = [
        BoxRead(name=box.name, queue=box.queue, heartbeat_at=box.heartbeat_at, gpus=[read(g) for g in box.gpus])
        for box in boxes
    ]
    total = sum(len(b.gpus) for b in data)
    return GpuView(data=data, total=total, in_use=sum(1 for b in data for g in b.gpus if g.job))


@router.get("/queue", response_model=QueueView, responses=documented(401))
def queue(session: SessionDep, user: CurrentUser) -> QueueView:
    """Every unfinished job of every user (name, owner, state, GPUs): what runs and what waits, in order."""
    active = [s.value for s in ACTIVE_STATES]
    running = session.scalars(select(Job).where(Job.state.in_(active)).order_by(Job.started_at, Job.created_at)).all()
    waiting = session.scalars(queued_order(select(Job))).all()
    data = [
        QueueEntry(
            **public_job(job, user),
            gpus=job.gpus,
            priority=job.priority,
            queue_position=position,
            start_eta_s=start_eta_s(job),
            box=job.box,
            gpu_ids=job.gpu_ids,
            created_at=job.created_at,
            started_at=job.started_at,
        )
        for position, job in [(None, j) for j in running] + list(enumerate(waiting, 1))
    ]
    return QueueView(data=data)


async def metrics_access(request: Request, credentials: BearerDep) -> None:
    """/metrics needs a token unless TRAINBOX_METRICS_PUBLIC is set (a private scrape network)."""
    if not request.app.state.settings.metrics_public:
        await current_user(request, credentials)


def _check_db(request: Request) -> None:
    with request.app.state.read_sessions() as session:
        session.execute(text("SELECT 1"))


@router.get("/healthz")
async def healthz(request: Request) -> JSONResponse:
    """Liveness with database and Redis checks; 503 when either is down."""
    checks: dict[str, str] = {}
    try:
        # Its own thread: a busy API (every request thread taken) still answers whether the DB is up.
        limiter = request.app.state.admission.health_db
        await asyncio.wait_for(anyio.to_thread.run_sync(_check_db, request, limiter=limiter), timeout=5)
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
    body: dict[str, object] = {"status": "ok" if healthy else "unavailable", **checks}
    stack_file = request.app.state.settings.stack_file
    if stack_file is not None:
        body["restarts"] = _restarts(stack_file)
    return JSONResponse(body, status_code=200 if healthy else 503)


def _restarts(stack_file: Path) -> dict[str, int]:
    """Under `trainbox up`: how often its supervisor restarted each child (from the stack's record)."""
    try:
        children = json.loads(stack_file.read_text()).get("children", {})
    except (OSError, ValueError):
        return {}
    return {name: int(child.get("restarts", 0)) for name, child in children.items()}


@router.get("/metrics", include_in_schema=False, dependencies=[Depends(metrics_access)])
def metrics(request: Request) -> Response:
    """Prometheus exposition: jobs by state, GPUs in use, HTTP requests."""
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def dashboard() -> HTMLResponse:
    """The dashboard page (public HTML; it asks for a token and sends it with every data call)."""
    return HTMLResponse(DASHBOARD_HTML)
