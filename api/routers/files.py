"""A job's files: the training log and the artifacts (final model, checkpoints)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse, PlainTextResponse, Response, StreamingResponse

from api.artifacts import TarStream, artifact_path, checkpoint_dir, list_artifacts, tail_lines
from api.deps import JobDep, SettingsDep
from api.errors import NotFound, documented
from api.schemas import Artifacts
from trainer.events import LOG_FILE

router = APIRouter(prefix="/jobs/{job_id}", tags=["files"], responses=documented(404))


@router.get("/logs", response_class=PlainTextResponse, responses={200: {"content": {"text/plain": {}}}})
def job_logs(
    job: JobDep,
    settings: SettingsDep,
    tail: Annotated[int | None, Query(ge=1, le=100_000, description="only the last N lines")] = None,
) -> PlainTextResponse:
    """The training log (every rank's output); empty until the job has started."""
    path = settings.run_dir(job.id) / LOG_FILE
    if not path.is_file():
        return PlainTextResponse("")
    if tail is None:
        return FileResponse(path, media_type="text/plain; charset=utf-8")  # type: ignore[return-value]
    lines = tail_lines(path, tail)
    return PlainTextResponse("\n".join(lines) + ("\n" if lines else ""))


@router.get("/artifacts", response_model=Artifacts)
def job_artifacts(job: JobDep, settings: SettingsDep) -> Artifacts:
    """The final model's files and the checkpoints, with sizes."""
    return Artifacts.model_validate(list_artifacts(settings.run_dir(job.id)))


@router.get(
    "/artifacts/{name:path}",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}, "application/x-tar": {}}}},
)
def download_artifact(job: JobDep, settings: SettingsDep, name: str) -> Response:
    """Download what /artifacts lists: a file, or a checkpoint directory as a tar (streamed)."""
    run_dir = settings.run_dir(job.id)
    directory = checkpoint_dir(run_dir, name)
    if directory is not None:
        try:
            tar = TarStream(directory)
        except FileNotFoundError:  # the trainer pruned it just now (old checkpoints go as new ones land)
            raise NotFound(f"no artifact named {name!r}", ["path", "name"]) from None
        headers = {
            "Content-Disposition": f'attachment; filename="{directory.name}.tar"',
            "Content-Length": str(tar.length),
        }
        return StreamingResponse(iter(tar), media_type="application/x-tar", headers=headers)
    path = artifact_path(run_dir, name)
    return FileResponse(path, filename=path.name)
