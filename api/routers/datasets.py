"""Uploaded datasets: POST /datasets (multipart), GET /datasets (the caller's own)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from pathlib import Path
from typing import Annotated, BinaryIO, Literal

from fastapi import APIRouter, File, Form, UploadFile, status
from sqlalchemy import select

from api.deps import CurrentUser, SessionDep, SettingsDep
from api.errors import PayloadTooLarge, Unprocessable, documented
from api.schemas import DatasetPage, DatasetRead
from core.models import Dataset, new_job_id, utcnow
from trainer.paths import UPLOADS_DIR, SpecError, inspect_dataset, uploaded_dataset_path
from trainer.spec import DatasetRef

router = APIRouter(prefix="/datasets", tags=["datasets"])

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
COPY_CHUNK = 1 << 20


def new_dataset_id() -> str:
    """Like a job id (time-sortable, random tail) with a 'd': the server chooses it, never the client."""
    return "d" + new_job_id()[1:]


def clean_filename(name: str | None) -> str:
    """The upload's own name, kept only as a label: its last component, safe characters, bounded."""
    base = _UNSAFE.sub("_", Path((name or "").replace("\\", "/")).name).strip("._")
    return base[:200] or "upload"


def _copy_capped(src: BinaryIO, dst: Path, limit: int) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with dst.open("xb") as out:
        while chunk := src.read(COPY_CHUNK):
            size += len(chunk)
            if size > limit:
                msg = f"dataset is larger than {limit} bytes (TRAINBOX_MAX_UPLOAD_BYTES)"
                raise PayloadTooLarge(msg, ["body", "file"])
            digest.update(chunk)
            out.write(chunk)
    return size, digest.hexdigest()


@router.post("", status_code=status.HTTP_201_CREATED, response_model=DatasetRead, responses=documented(413))
def upload_dataset(
    file: Annotated[UploadFile, File(description="JSONL (one object per line with the text field) or UTF-8 text")],
    session: SessionDep,
    settings: SettingsDep,
    user: CurrentUser,
    text_field: Annotated[str, Form(min_length=1, max_length=100, pattern=r"^[^\x00]+$")] = "text",
    format: Annotated[Literal["auto", "jsonl", "text"], Form()] = "auto",  # noqa: A002 - the field's name
) -> DatasetRead:
    """Upload a training file; every line is checked. Name the returned id in a spec: `{"id": ...}`."""
    assert settings.data_root is not None
    uploads = settings.data_root.resolve() / UPLOADS_DIR
    uploads.mkdir(parents=True, exist_ok=True)
    dataset_id = new_dataset_id()
    part = uploads / f".{dataset_id}.part"
    final = uploaded_dataset_path(settings.data_root.resolve(), dataset_id)
    try:
        size, sha = _copy_capped(file.file, part, settings.max_upload_bytes)
        ref = DatasetRef(id=dataset_id, text_field=text_field, format=format)
        try:
            info = inspect_dataset(part, ref)
        except SpecError as e:
            field = "text_field" if e.field.endswith("text_field") else "file"
            raise Unprocessable(f"upload refused: {e}", ["body", field]) from None
        os.replace(part, final)
        row = Dataset(
            id=dataset_id,
            owner=user.name,
            filename=clean_filename(file.filename),
            format=info.format,
            text_field=text_field,
            records=info.records,
            bytes=size,
            sha256=sha,
            created_at=utcnow(),
        )
        session.add(row)
        session.commit()
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
        with contextlib.suppress(FileNotFoundError):
            final.unlink()
        raise
    return DatasetRead.model_validate(row, from_attributes=True)


@router.get("", response_model=DatasetPage)
def list_datasets(session: SessionDep, user: CurrentUser) -> DatasetPage:
    """Your uploaded datasets, newest first."""
    rows = session.scalars(select(Dataset).where(Dataset.owner == user.name).order_by(Dataset.created_at.desc()))
    return DatasetPage(data=[DatasetRead.model_validate(r, from_attributes=True) for r in rows])
