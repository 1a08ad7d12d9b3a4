"""Jobs: submit, validate, list, read, cancel, step history."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response, status
from sqlalchemy import Engine, Row
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.deps import CurrentUser, DispatchDep, JobDep, JobId, SessionDep, SettingsDep, visible
from api.errors import documented
from api.limits import check_disk_quota, check_queue_limit, check_submit_rate
from api.schemas import JobPage, JobRead, JobSummary, MetricPage, ValidateResult
from api.validation import admit, dry_run, reschedule, with_defaults
from core import jobs as service
from core.jobs import JobNotFound
from core.states import JobState
from core.users import Principal
from trainer.spec import DEFAULT_MAX_RUNTIME_S, JobSpec

router = APIRouter(prefix="/jobs", tags=["jobs"])


def read_job(session: Session, job_id: str) -> JobRead:
    """The job as GET /jobs/{id} shows it, read now: a scheduling pass in this session may just have stored
    its queue position."""
    row = service.job_row(session.connection(), job_id)
    if row is None:
        raise JobNotFound(job_id)
    return JobRead.of(row)


def _job_row(engine: Engine, job_id: str) -> Row[Any] | None:
    with engine.connect() as conn:
        return service.job_row(conn, job_id)


# A created job's id leads to its other routes (OpenAPI links: clients and schemathesis follow them).
_JOB_ID = {"job_id": "$response.body#/id"}
JOB_LINKS = {
    "GetJob": {"operationRef": "#/paths/~1jobs~1{job_id}/get", "parameters": _JOB_ID},
    "CancelJob": {"operationRef": "#/paths/~1jobs~1{job_id}~1cancel/post", "parameters": _JOB_ID},
    "JobMetrics": {"operationRef": "#/paths/~1jobs~1{job_id}~1metrics/get", "parameters": _JOB_ID},
    "JobLogs": {"operationRef": "#/paths/~1jobs~1{job_id}~1logs/get", "parameters": _JOB_ID},
    "JobArtifacts": {"operationRef": "#/paths/~1jobs~1{job_id}~1artifacts/get", "parameters": _JOB_ID},
}
# The 422 rules a JSON schema cannot state: each error's `type`, and when a spec breaks it.
SPEC_RULES = {
    "batch_arithmetic": "the batch arithmetic fails: DeepSpeed needs train_batch_size = "
    "train_micro_batch_size_per_gpu x gradient_accumulation_steps x gpus, each within its limit; any two "
    "given derive the third, and the message names valid nearby choices",
    "precision_conflict": "fp16 and bf16 are both enabled",
    "deepspeed_conflict": "offload_optimizer.ratio < 1 without ZeRO stage 3",
    "validation_conflict": "validation (a file) and validation_split are both given, or eval_every or "
    "keep_best is set without either",
    "file_not_usable": "the model, dataset or validation file is not usable on this server: not found under "
    "its root, not in the local Hugging Face cache, an invalid hub id, a symlink loop, unreadable or malformed "
    "data (the message names the file and the line), or validation data of another format than the training data",
    "does_not_fit": "no box has that many GPUs, or the estimated memory per GPU (per rank on a CPU box) is "
    "more than the best box offers (the message gives the estimate and the nearest settings that fit)",
    "too_many_steps": "epochs over the dataset come to more optimizer steps than a job may have",
}
SPEC_RULES_DOC = (
    "\nA schema-valid spec is still refused with **422** when (the error's `type` names the rule):\n"
    + "".join(f"- `{rule}`: {text};\n" for rule, text in SPEC_RULES.items())
    + f"\nA spec without `max_runtime_s` gets {DEFAULT_MAX_RUNTIME_S} s, or the caller's cap when that is lower; "
    "the job (and the validate result) shows the value it got.\n"
)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=JobRead,
    responses={201: {"description": "the job, queued (or already placed)", "links": JOB_LINKS}}
    | documented(403, 409, 413, 429),
    description="Submit a training job; it is queued and placed on GPUs as soon as they are free.\n" + SPEC_RULES_DOC,
)
def submit_job(
    spec: JobSpec,
    request: Request,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    user: CurrentUser,
    dispatch: DispatchDep,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=200)] = None,
) -> JobRead:
    """Submit a training job; it is queued and placed on GPUs as soon as they are free."""
    check_submit_rate(request.app.state.sync_redis, user)
    spec, _ = with_defaults(spec, user)
    if idempotency_key is not None:
        earlier = service.find_replay(session=session, owner=user.name, key=idempotency_key, spec=spec)
        if earlier is not None:
            response.headers["Idempotent-Replayed"] = "true"
            return read_job(session, earlier.id)
    admitted = admit(spec, settings, session, user)
    check_queue_limit(session, user)
    check_disk_quota(session, user)
    submitted = service.create_job(
        session=session,
        owner=user.name,
        spec=admitted.spec,
        idempotency_key=idempotency_key,
        max_attempts=settings.max_attempts,
    )
    if submitted.created:
        request.app.state.publish(submitted.job.id, {"type": "state", "state": JobState.QUEUED.value})
        reschedule(session, dispatch, settings, f"submit of {submitted.job.id}")
    else:
        response.headers["Idempotent-Replayed"] = "true"
    return read_job(session, submitted.job.id)


@router.post(
    "/validate",
    response_model=ValidateResult,
    responses=documented(403, 413),
    description="Dry run: the resolved DeepSpeed config, batch sizes, memory estimate and queue position. "
    "It runs every check POST /jobs runs, so it answers 200 exactly when POST /jobs would accept the spec.\n"
    + SPEC_RULES_DOC,
)
def validate_job(spec: JobSpec, session: SessionDep, settings: SettingsDep, user: CurrentUser) -> ValidateResult:
    """Dry run: the resolved DeepSpeed config, batch sizes, memory estimate and queue position."""
    return ValidateResult(**dry_run(spec, settings, session, user))


@router.get("", response_model=JobPage)
def list_jobs(
    session: SessionDep,
    user: CurrentUser,
    state: Annotated[list[JobState] | None, Query(description="repeat to match several states")] = None,
    owner: Annotated[str | None, Query(max_length=100)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[
        str | None,
        Query(max_length=60, pattern=service.CURSOR_PATTERN, description="`next_cursor` of the previous page"),
    ] = None,
) -> Response:
    """Your jobs (admins: everyone's), newest first, one page at a time. GET /queue shows every job."""
    # Encoded once: a returned Response skips FastAPI's second validation of 50 jobs.
    page = job_page(session, user, states=state, owner=owner, limit=limit, cursor=cursor)
    return Response(page.model_dump_json(), media_type="application/json")


def job_page(
    session: Session,
    user: Principal,
    *,
    states: list[JobState] | None,
    owner: str | None,
    limit: int,
    cursor: str | None,
) -> JobPage:
    """A page of the jobs `user` may see (GET /jobs, and the dashboard's overview)."""
    if not user.is_admin:
        if owner is not None and owner != user.name:
            return JobPage(data=[], next_cursor=None)
        owner = user.name
    page, next_cursor = service.list_jobs(session, states=states, owner=owner, limit=limit, cursor=cursor)
    return JobPage(data=[JobSummary.of(j) for j in page], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobRead, responses=documented(404))
async def get_job(job_id: JobId, request: Request, user: CurrentUser) -> Response:
    """One job: state, placement, progress with ETA, latest metrics, error, artifacts."""
    # What dashboards and CLIs poll, so it is lean: one Core SELECT in the thread pool (no session, no
    # ORM instance) and the answer encoded once (a returned Response skips FastAPI's second validation).
    row = visible(await run_in_threadpool(_job_row, request.app.state.read_engine, job_id), job_id, user)
    return Response(JobRead.of(row).model_dump_json(), media_type="application/json")


@router.post(
    "/{job_id}/cancel", status_code=status.HTTP_202_ACCEPTED, response_model=JobRead, responses=documented(404, 413)
)
def cancel_job(
    job: JobDep, request: Request, session: SessionDep, settings: SettingsDep, dispatch: DispatchDep
) -> JobRead:
    """Cancel: a queued job ends at once, a running one is stopped by its worker. Idempotent."""
    before = job.state
    after = service.request_cancel(session=session, job_id=job.id, publish=request.app.state.publish)
    if after.state == JobState.CANCELLED and before == JobState.QUEUED:
        # The cancelled job may have been the head that blocked the queue.
        reschedule(session, dispatch, settings, f"cancel of {job.id}")
    return read_job(session, job.id)


@router.get("/{job_id}/metrics", response_model=MetricPage, responses=documented(404))
def job_metrics(
    job: JobDep,
    session: SessionDep,
    after_step: Annotated[int, Query(ge=-1, le=2**31 - 1, description="steps are 32-bit")] = -1,
    limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
) -> MetricPage:
    """Step history (loss, lr, throughput, MFU, memory) after `after_step`, in step order."""
    rows = service.list_metrics(session, job.id, after_step=after_step, limit=limit)
    data = [service.metric_dict(m) for m in rows]
    return MetricPage.model_validate({"data": data, "next_after_step": rows[-1].step if len(rows) == limit else None})
