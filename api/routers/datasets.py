"""Uploaded datasets: POST /datasets (multipart), GET /datasets (the caller's own), DELETE /datasets/{id}.

Uploads are private: the uploads directory is 0700 and each file 0600. Each user has a quota on how
many uploads they keep and on their total bytes (settings, or per user: `trainbox-admin users set`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, BinaryIO, Literal

from fastapi import APIRouter, File, Form, Response, UploadFile, status
from fastapi import Path as PathParam
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.deps import CurrentUser, SessionDep, SettingsDep
from api.errors import ERROR_SCHEMA, ApiError, Conflict, NotFound, PayloadTooLarge, Unprocessable, documented
from api.limits import check_upload_quota, upload_bytes_exceeded
from api.schemas import DatasetPage, DatasetRead
from core.datasets import DatasetInUse, delete_dataset
from core.models import Dataset, new_job_id
from core.settings import Settings
from core.users import Principal, get_user
from trainer.paths import UPLOADS_DIR, DatasetInfo, SpecError, inspect_dataset, uploaded_dataset_path
from trainer.spec import DatasetRef

router = APIRouter(prefix="/datasets", tags=["datasets"])

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
COPY_CHUNK = 1 << 20
DatasetId = Annotated[str, PathParam(min_length=1, max_length=32, pattern=r"^[0-9a-z]+$")]


IN_USE: dict[int | str, dict[str, Any]] = {
    409: {
        "description": "an unfinished job (queued, starting, running, cancelling) trains on it",
        "content": {"application/json": {"schema": ERROR_SCHEMA}},
    }
}


def new_dataset_id() -> str:
    """Like a job id (time-sortable, random tail) with a 'd': the server chooses it, never the client."""
    return "d" + new_job_id()[1:]


def clean_filename(name: str | None) -> str:
    """The upload's own name, kept only as a label: its last component, safe characters, bounded."""
    base = _UNSAFE.sub("_", Path((name or "").replace("\\", "/")).name).strip("._")
    return base[:200] or "upload"


def _private_dir(path: Path) -> Path:
    """The directory, made (or narrowed to) 0700: only the service's user reads uploads."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def _copy_capped(src: BinaryIO, dst: Path, limit: int, too_big: Callable[[], ApiError]) -> tuple[int, str]:
    """Copy into a new 0600 file, stopping with `too_big()` past `limit` bytes; (size, sha256)."""
    digest = hashlib.sha256()
    size = 0
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.fchmod(fd, 0o600)  # exactly 0600, whatever the umask
    with os.fdopen(fd, "wb") as out:
        while chunk := src.read(COPY_CHUNK):
            size += len(chunk)
            if size > limit:
                raise too_big()
            digest.update(chunk)
            out.write(chunk)
    return size, digest.hexdigest()


# The upload's format as a spec reads it (trainer.spec.DatasetRef): auto detects chat, prompt_completion
# or text records from the first one, and every record is then checked as that format.
UploadFormat = Literal["", "auto", "jsonl", "text", "prompt_completion", "chat"]


def stored_format(info: DatasetInfo) -> str:
    """What `datasets.format` records: chat or prompt_completion (JSONL of that format), jsonl (JSONL text
    records) or text (plain text lines): each a value of DatasetRef.format that reads the file as checked."""
    if info.data_format in ("chat", "prompt_completion"):
        return info.data_format
    return info.format


def receive_upload(
    file: UploadFile, *, session: Session, settings: Settings, user: Principal, text_field: str, format: str
) -> Dataset:
    """Store an upload as a dataset, checked completely as training data, and commit its row.

    Unprocessable (naming the line) when a record does not fit its format; 403 past the user's quota,
    413 past the upload cap. Nothing is left behind by a refused upload.
    """
    assert settings.data_root is not None
    allowance = check_upload_quota(session, user)
    session.commit()  # end the read: on SQLite it would hold the write lock through the copy
    uploads = _private_dir(settings.data_root.resolve() / UPLOADS_DIR)
    dataset_id = new_dataset_id()
    part = uploads / f".{dataset_id}.part"
    final = uploaded_dataset_path(settings.data_root.resolve(), dataset_id)
    per_file = settings.max_upload_bytes

    def too_big() -> ApiError:
        if allowance < per_file:
            return upload_bytes_exceeded(user, user.limits.max_dataset_bytes - allowance)
        return PayloadTooLarge(f"dataset is larger than {per_file} bytes (TRAINBOX_MAX_UPLOAD_BYTES)", ["body", "file"])

    try:
        size, sha = _copy_capped(file.file, part, min(per_file, allowance), too_big)
        ref = DatasetRef(id=dataset_id, text_field=text_field, format=format)  # type: ignore[arg-type]
        try:
            info = inspect_dataset(part, ref)
        except SpecError as e:
            field = "text_field" if e.field.endswith("text_field") else "file"
            raise Unprocessable(f"upload refused: {e}", ["body", field]) from None
        os.replace(part, final)
        # Counted again under the user's lock: concurrent uploads cannot pass the quota together.
        get_user(session, user.name, lock=True)
        check_upload_quota(session, user, adding=size)
        row = Dataset(
            id=dataset_id,
            owner=user.name,
            filename=clean_filename(file.filename),
            format=stored_format(info),
            text_field=text_field,
            records=info.records,
            bytes=size,
            sha256=sha,
        )
        session.add(row)
        session.commit()
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
        with contextlib.suppress(FileNotFoundError):
            final.unlink()
        raise
    return row


@router.post("", status_code=status.HTTP_201_CREATED, response_model=DatasetRead, responses=documented(403, 413))
def upload_dataset(
    file: Annotated[
        UploadFile,
        File(description="JSONL (chat, prompt_completion or text records, docs/DATA.md) or UTF-8 text"),
    ],
    session: SessionDep,
    settings: SettingsDep,
    user: CurrentUser,
    # An empty form value means the default (as forms send an untouched field): the schema says so.
    text_field: Annotated[
        str, Form(max_length=100, pattern=r"^[^\x00]*$", description="the JSONL text field; empty: text")
    ] = "text",
    format: Annotated[  # noqa: A002
        UploadFormat, Form(description="empty or auto: detected from the first record; then every record is checked")
    ] = "auto",
) -> DatasetRead:
    """Upload a training file; every line is checked as its format (chat, prompt_completion or text), and
    a bad one is a 422 that names it. Name the returned id in a spec: `{"id": ...}`. `format` is what
    was detected (chat, prompt_completion, jsonl for JSONL text records, text for plain text).

    403 when it would take you past your quota of uploads (count or total bytes)."""
    row = receive_upload(
        file, session=session, settings=settings, user=user, text_field=text_field or "text", format=format or "auto"
    )
    return DatasetRead.model_validate(row, from_attributes=True)


@router.get("", response_model=DatasetPage)
def list_datasets(session: SessionDep, user: CurrentUser) -> DatasetPage:
    """Your uploaded datasets, newest first."""
    rows = session.scalars(select(Dataset).where(Dataset.owner == user.name).order_by(Dataset.created_at.desc()))
    return DatasetPage(data=[DatasetRead.model_validate(r, from_attributes=True) for r in rows])


@router.delete("/{dataset_id}", status_code=status.HTTP_204_NO_CONTENT, responses={**documented(404), **IN_USE})
def remove_dataset(dataset_id: DatasetId, session: SessionDep, settings: SettingsDep, user: CurrentUser) -> Response:
    """Delete one of your uploads (admins: anyone's), its file too; 409 while an unfinished job uses it."""
    assert settings.data_root is not None
    row = session.get(Dataset, dataset_id, with_for_update=True)
    if row is None or not user.can_see(row.owner):
        raise NotFound(f"no uploaded dataset with id {dataset_id!r}", ["path", "dataset_id"])
    try:
        delete_dataset(session, row=row, data_root=settings.data_root.resolve())
    except DatasetInUse as e:
        raise Conflict(str(e), ["path", "dataset_id"]) from None
    return Response(status_code=status.HTTP_204_NO_CONTENT)
