"""/v1/fine_tuning/jobs: trainbox jobs as OpenAI fine-tuning jobs. A created job goes through POST /jobs's
own submission (same checks, limits, quotas and scheduling); cancel is POST /jobs/{id}/cancel; pause
holds a job out of the scheduler (`jobs.paused_at`), and a running one takes the worker's
checkpoint-and-requeue path."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from sqlalchemy import and_, case, or_, select, update
from sqlalchemy.orm import Session

from api.deps import CurrentUser, DispatchDep, SessionDep, SettingsDep, job_for_user
from api.errors import ApiError, NotFound
from api.openai import history
from api.openai.errors import BadRequest
from api.openai.mapping import fine_tuning_job, parse_job_id, request_loc, spec_body, validate_spec
from api.openai.schemas import CheckpointList, EventList, FineTuningJob, JobCreate, JobList
from api.routers import jobs as jobs_routes
from api.validation import reschedule
from core.jobs import JobNotFound, get_job
from core.models import Dataset, Job, utcnow
from core.states import JobState
from core.users import Principal

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["openai"], include_in_schema=False)

_META_KEY = re.compile(r"metadata\[([^\]]{1,64})\]")


def fine_tuning_job_for_user(
    fine_tuning_job_id: Annotated[str, Path(max_length=64)], session: SessionDep, user: CurrentUser
) -> Job:
    """The job `ftjob-<id>` (or the bare trainbox id) names, if the caller may see it; 404 otherwise."""
    try:
        return job_for_user(parse_job_id(fine_tuning_job_id), session, user)
    except JobNotFound:
        raise NotFound(
            f"no fine-tuning job with id {fine_tuning_job_id!r}", ["path", "fine_tuning_job_id"], type_="job_not_found"
        ) from None


FtJobDep = Annotated[Job, Depends(fine_tuning_job_for_user)]


def _training_data(session: Session, user: Principal, ref: str, param: str) -> Dataset:
    """The caller's own upload a file id names (only its owner may train on it); 400 naming `param` otherwise."""
    row = session.get(Dataset, ref.removeprefix("file-")) if ref.startswith("file-d") else None
    if row is None or row.owner != user.name:
        raise BadRequest(f"{param} {ref!r}: no such file of yours", ["body", param], type_="file_not_found")
    return row


def _data_format(row: Dataset) -> str:
    return row.format if row.format in ("chat", "prompt_completion") else "text"


def _view(job: Job, session: SessionDep, settings: SettingsDep) -> FineTuningJob:
    session.refresh(job)
    return fine_tuning_job(job, run_dir=settings.run_dir(job.id))


@router.post("", response_model=FineTuningJob)
def create_fine_tuning_job(
    req: JobCreate,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    user: CurrentUser,
    dispatch: DispatchDep,
) -> FineTuningJob:
    """Create a fine-tuning job: the request becomes a JobSpec (docs/OPENAI.md), submitted as POST /jobs."""
    if req.integrations:
        raise BadRequest("integrations are not supported", ["body", "integrations"], type_="unsupported_parameter")
    train = _training_data(session, user, req.training_file, "training_file")
    validation = None
    if req.validation_file is not None:
        validation = _training_data(session, user, req.validation_file, "validation_file")
        if _data_format(validation) != _data_format(train):
            raise BadRequest(
                f"validation_file is {_data_format(validation)} data but training_file is {_data_format(train)}: "
                "both must be of one format",
                ["body", "validation_file"],
                type_="invalid_file_format",
            )
    spec = validate_spec(spec_body(req, train=train, validation=validation), req)
    try:
        submitted = jobs_routes.submit_job(spec, request, Response(), session, settings, user, dispatch)
    except ApiError as e:
        # A limit or a file check names a spec field: name the request's field instead.
        if e.loc[:1] == ["body"] and len(e.loc) > 1:
            e.loc = ["body", *request_loc(e.loc[1:], req)]
        raise
    # Not a state change: what the OpenAI view shows beside the spec, on the job's own row.
    session.execute(
        update(Job)
        .where(Job.id == submitted.id)
        .values(suffix=req.suffix, job_metadata=req.metadata)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return _view(get_job(session, submitted.id), session, settings)


@router.get("", response_model=JobList)
def list_fine_tuning_jobs(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    user: CurrentUser,
    after: Annotated[str | None, Query(max_length=64, description="the last job id of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> JobList:
    """Your jobs, newest first; `metadata[key]=value` (repeatable) keeps the jobs with that metadata."""
    query = select(Job).where(Job.owner == user.name).order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
    if after is not None:
        last = session.get(Job, parse_job_id(after))
        if last is None or last.owner != user.name:
            raise BadRequest(f"after {after!r} is not one of your jobs", ["query", "after"], type_="invalid_value")
        query = query.where(
            or_(Job.created_at < last.created_at, and_(Job.created_at == last.created_at, Job.id < last.id))
        )
    for name, value in request.query_params.multi_items():
        m = _META_KEY.fullmatch(name)
        if m is not None:
            query = query.where(Job.job_metadata[m.group(1)].as_string() == value)
        elif name.startswith("metadata"):
            raise BadRequest(
                f"{name!r}: filter by metadata as metadata[key]=value", ["query", name], type_="invalid_value"
            )
    jobs = list(session.scalars(query))
    data = [fine_tuning_job(j, run_dir=settings.run_dir(j.id)) for j in jobs[:limit]]
    return JobList(data=data, has_more=len(jobs) > limit)


@router.get("/{fine_tuning_job_id}", response_model=FineTuningJob)
def retrieve_fine_tuning_job(job: FtJobDep, session: SessionDep, settings: SettingsDep) -> FineTuningJob:
    """One fine-tuning job (the same job as GET /jobs/{id})."""
    return _view(job, session, settings)


@router.post("/{fine_tuning_job_id}/cancel", response_model=FineTuningJob)
def cancel_fine_tuning_job(
    job: FtJobDep, request: Request, session: SessionDep, settings: SettingsDep, dispatch: DispatchDep
) -> FineTuningJob:
    """Cancel, as POST /jobs/{id}/cancel: a queued job ends at once, a running one is stopped by its worker."""
    if job.state in ("succeeded", "failed", "cancelled"):
        raise BadRequest(f"the job has already {job.state}", ["path", "fine_tuning_job_id"], type_="invalid_state")
    jobs_routes.cancel_job(job, request, session, settings, dispatch)
    return _view(job, session, settings)


@router.get("/{fine_tuning_job_id}/events", response_model=EventList)
def list_fine_tuning_events(
    job: FtJobDep,
    session: SessionDep,
    after: Annotated[str | None, Query(max_length=100, description="the last event id of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> EventList:
    """The job's events, newest first: created, started, one `metrics` event per step, and its end."""
    events, more = history.list_events(session, job, after=after, limit=limit)
    return EventList(data=events, has_more=more)


@router.get("/{fine_tuning_job_id}/checkpoints", response_model=CheckpointList)
def list_fine_tuning_checkpoints(
    job: FtJobDep,
    session: SessionDep,
    settings: SettingsDep,
    after: Annotated[str | None, Query(max_length=100)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
) -> CheckpointList:
    """The job's complete checkpoints, newest first, with the train and validation loss at their steps."""
    checkpoints, more = history.list_checkpoints(session, job, settings.run_dir(job.id), after=after, limit=limit)
    return CheckpointList(
        data=checkpoints,
        has_more=more,
        first_id=checkpoints[0].id if checkpoints else None,
        last_id=checkpoints[-1].id if checkpoints else None,
    )


def hold(session: Session, job_id: str) -> bool:
    """Pause a queued, starting or running job and commit; False when it is not in one of those states
    or already paused. Not a state change: `paused_at` keeps the scheduler from placing it, and the
    worker of a running one stops it as when the worker goes away (checkpoint, back to the queue)."""
    running = (JobState.STARTING.value, JobState.RUNNING.value)
    paused = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state.in_([JobState.QUEUED.value, *running]), Job.paused_at.is_(None))
        # Stopping a run to pause it costs an attempt (the next one resumes from the checkpoint): it is
        # given back, so pausing never uses up the attempts a job has for real failures.
        .values(
            paused_at=utcnow(),
            max_attempts=case((Job.state.in_(running), Job.max_attempts + 1), else_=Job.max_attempts),
        )
        .execution_options(synchronize_session=False)
    ).rowcount
    session.commit()
    return bool(paused)


def release(session: Session, job_id: str) -> bool:
    """Resume a paused job and commit (the caller runs the scheduler); False when it was not paused."""
    released = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.paused_at.is_not(None))
        .values(paused_at=None)
        .execution_options(synchronize_session=False)
    ).rowcount
    session.commit()
    return bool(released)


@router.post("/{fine_tuning_job_id}/pause", response_model=FineTuningJob)
def pause_fine_tuning_job(job: FtJobDep, session: SessionDep, settings: SettingsDep) -> FineTuningJob:
    """Pause: a queued job is not placed until resumed; a running one is stopped by its worker with a
    checkpoint (the path a worker going away takes) and waits in the queue, paused, to resume from it."""
    if not hold(session, job.id):
        session.refresh(job)
        if job.paused_at is None:
            raise BadRequest(
                f"a {job.state} job cannot be paused", ["path", "fine_tuning_job_id"], type_="invalid_state"
            )
    return _view(job, session, settings)


@router.post("/{fine_tuning_job_id}/resume", response_model=FineTuningJob)
def resume_fine_tuning_job(
    job: FtJobDep, session: SessionDep, settings: SettingsDep, dispatch: DispatchDep
) -> FineTuningJob:
    """Resume a paused job: it is placed again in its turn and continues from its newest checkpoint."""
    if not release(session, job.id):
        raise BadRequest("the job is not paused", ["path", "fine_tuning_job_id"], type_="invalid_state")
    reschedule(session, dispatch, settings, f"resume of {job.id}")
    return _view(job, session, settings)
