"""The dashboard's one request per refresh: GPUs, queue, your jobs (and one open job) in one response.

Each part is what its own endpoint answers (GET /gpus, /queue, /jobs, /jobs/{id}), built by the same
functions under the same rules: everyone sees every slot and the public queue, a user sees their own
jobs (an admin everyone's), and a job they may not open is a 404. A page polling this every few
seconds costs one request and one DB session instead of one per panel.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field

from api.deps import CurrentUser, JobId, SessionDep, visible
from api.errors import documented
from api.routers.jobs import job_page
from api.routers.system import list_gpus, queue
from api.schemas import GpuView, JobPage, JobRead, QueueView
from core.jobs import job_row

router = APIRouter(tags=["system"])


class Me(BaseModel):
    name: str
    is_admin: bool


class Overview(BaseModel):
    """GET /gpus, /queue, /jobs (and /jobs/{id} when asked) in one response."""

    now: datetime = Field(description="the server's clock, for elapsed times that do not depend on the browser's")
    user: Me = Field(description="who the token belongs to (GET /users/me has the limits and disk use)")
    gpus: GpuView
    queue: QueueView
    jobs: JobPage = Field(description="your newest jobs (admins: everyone's), as GET /jobs?limit= returns them")
    job: JobRead | None = Field(None, description="the job named by `job`, as GET /jobs/{id} returns it")


@router.get("/overview", response_model=Overview, responses=documented(404))
def overview(
    request: Request,
    session: SessionDep,
    user: CurrentUser,
    job: Annotated[JobId | None, Query(description="also return this job (404 if you may not see it)")] = None,
    limit: Annotated[int, Query(ge=1, le=200, description="how many of the newest jobs")] = 50,
) -> Overview:
    """The dashboard's view in one request: who you are, GPUs, queue, your newest jobs, and one job."""
    opened = JobRead.of(visible(job_row(session.connection(), job), job, user)) if job is not None else None
    return Overview(
        now=datetime.now(UTC),
        user=Me(name=user.name, is_admin=user.is_admin),
        gpus=list_gpus(session, user),
        queue=queue(session, user),
        jobs=job_page(session, user, states=None, owner=None, limit=limit, cursor=None),
        job=opened,
    )
