"""/v1/files: uploads (trainbox datasets, checked completely as training data) and jobs' results files."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, Response, UploadFile
from fastapi.responses import FileResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.deps import CurrentUser, SessionDep, SettingsDep
from api.errors import Conflict, NotFound
from api.openai.errors import BadRequest
from api.openai.mapping import (
    dataset_for,
    file_object,
    has_results,
    parse_file_id,
    results_csv,
    results_file,
)
from api.openai.schemas import FileDeleted, FileList, FileObject
from api.routers.datasets import receive_upload
from core.datasets import DatasetInUse, delete_dataset
from core.models import Dataset, Job
from core.users import Principal
from trainer.paths import uploaded_dataset_path

PATH = "/v1/files"
router = APIRouter(prefix=PATH, tags=["openai"], include_in_schema=False)


def _job_results(session: Session, user: Principal, ref: str) -> Job:
    """The job whose results file `ref` names, if the caller may see it and it has ended; 404 otherwise."""
    job = session.get(Job, parse_file_id(ref))
    if job is None or not user.can_see(job.owner) or not has_results(job):
        raise NotFound(f"no file with id {ref!r}", ["path", "file_id"], type_="file_not_found")
    return job


@router.post("", response_model=FileObject)
def create_file(
    file: Annotated[UploadFile, File(description="JSONL: chat, prompt_completion or text records (docs/DATA.md)")],
    purpose: Annotated[str, Form(max_length=100, description="fine-tune (the only purpose trainbox keeps)")],
    session: SessionDep,
    settings: SettingsDep,
    user: CurrentUser,
) -> FileObject:
    """Upload a training file: a trainbox dataset, every line checked (a bad one is a 400 naming it)."""
    if purpose != "fine-tune":
        raise BadRequest(
            f"purpose {purpose!r} is not supported: trainbox keeps training files only (purpose 'fine-tune')",
            ["body", "purpose"],
            type_="invalid_purpose",
        )
    row = receive_upload(file, session=session, settings=settings, user=user, text_field="text", format="auto")
    return file_object(row)


@router.get("", response_model=FileList)
def list_files(
    session: SessionDep,
    user: CurrentUser,
    purpose: Annotated[Literal["fine-tune", "fine-tune-results"] | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
    after: Annotated[str | None, Query(max_length=100)] = None,
    order: Annotated[Literal["asc", "desc"], Query()] = "desc",
) -> FileList:
    """Your uploads, newest first; `purpose=fine-tune-results` lists your ended jobs' results files instead."""
    files: list[FileObject]
    if purpose == "fine-tune-results":
        jobs = session.scalars(select(Job).where(Job.owner == user.name, Job.finished_at.is_not(None)))
        files = [results_file(session, j) for j in jobs if has_results(j)]
    else:
        rows = session.scalars(select(Dataset).where(Dataset.owner == user.name))
        files = [file_object(r) for r in rows]
    files.sort(key=lambda f: (f.created_at, f.id), reverse=order == "desc")
    if after is not None:
        ids = [f.id for f in files]
        if after not in ids:
            raise BadRequest(f"after {after!r} is not one of your files", ["query", "after"], type_="invalid_value")
        files = files[ids.index(after) + 1 :]
    page = files[:limit]
    return FileList(
        data=page,
        has_more=len(files) > limit,
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
    )


@router.get("/{file_id}", response_model=FileObject)
def retrieve_file(file_id: str, session: SessionDep, user: CurrentUser) -> FileObject:
    """One file: an upload, or a job's results file."""
    if file_id.startswith("file-j"):
        return results_file(session, _job_results(session, user, file_id))
    return file_object(dataset_for(session, user, file_id))


@router.get("/{file_id}/content", response_class=Response)
def file_content(file_id: str, session: SessionDep, settings: SettingsDep, user: CurrentUser) -> Response:
    """The file's bytes: the upload as stored, or a results file's CSV (step, train_loss, valid_loss, ...)."""
    if file_id.startswith("file-j"):
        job = _job_results(session, user, file_id)
        return Response(results_csv(session, job.id), media_type="text/csv")
    row = dataset_for(session, user, file_id)
    assert settings.data_root is not None
    path = uploaded_dataset_path(settings.data_root.resolve(), row.id)
    return FileResponse(path, media_type="application/octet-stream", filename=row.filename)


@router.delete("/{file_id}", response_model=FileDeleted)
def delete_file(file_id: str, session: SessionDep, settings: SettingsDep, user: CurrentUser) -> FileDeleted:
    """Delete an upload, its file too; 409 while a queued or running job trains on it or evaluates with it."""
    if file_id.startswith("file-j"):
        _job_results(session, user, file_id)
        raise BadRequest(
            "a results file is a view of its job's metrics and cannot be deleted",
            ["path", "file_id"],
            type_="invalid_value",
        )
    row = dataset_for(session, user, file_id)
    session.refresh(row, with_for_update=True)
    assert settings.data_root is not None
    try:
        delete_dataset(session, row=row, data_root=settings.data_root.resolve())
    except DatasetInUse as e:
        raise Conflict(str(e), ["path", "file_id"], type_="file_in_use") from None
    return FileDeleted(id=file_id)
