"""Admin maintenance: POST /admin/prune deletes the checkpoints of finished jobs (`trainbox prune`)."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from api.deps import AdminUser, SessionDep, SettingsDep
from api.errors import Unprocessable, documented
from core.disk import prune_checkpoints, prune_token_cache

router = APIRouter(prefix="/admin", tags=["admin"])


class PruneRequest(BaseModel):
    """Which finished jobs lose their checkpoints; an empty body uses the retention setting."""

    model_config = ConfigDict(extra="forbid", strict=True)  # JSON numbers and booleans, not `false` or "7"

    older_than_days: float | None = Field(
        None,
        ge=0,
        le=36500,
        allow_inf_nan=False,
        description="jobs that finished at least this many days ago (0: every finished job); "
        "default: TRAINBOX_CHECKPOINT_RETENTION_DAYS",
    )
    dry_run: bool = Field(False, description="report what would be deleted, delete nothing")


class PrunedJobRead(BaseModel):
    id: str
    owner: str
    finished_at: datetime | None
    checkpoints: list[str] = Field(description="run-dir relative names of the checkpoints deleted")
    bytes: int = Field(description="bytes under the job's checkpoints directory")


class PrunedCacheRead(BaseModel):
    entries: int = Field(description="tokenized-data cache entries no job used for older_than_days")
    bytes: int


class PruneResult(BaseModel):
    dry_run: bool
    older_than_days: float
    jobs: list[PrunedJobRead]
    token_cache: PrunedCacheRead = Field(description="the shared tokenized-data cache's unused entries")
    bytes_freed: int = Field(description="bytes deleted, checkpoints and cache (a dry run: bytes that would be)")


# The 422 a JSON schema cannot state (its error type names the rule).
NO_RETENTION = "retention_not_set"


@router.post(
    "/prune",
    response_model=PruneResult,
    responses=documented(403, 413, 422),
    description="Delete the checkpoints of jobs that finished N days ago or more (admins only); their final "
    "models, events and logs stay, and each job's disk_bytes is measured again. Tokenized-data cache entries no "
    "job used for N days go too (a later job on that data tokenizes it again). `dry_run` reports what would "
    "go. Without older_than_days the server's TRAINBOX_CHECKPOINT_RETENTION_DAYS applies; with neither, **422** "
    f"(`type: {NO_RETENTION}`).",
)
def prune(
    session: SessionDep, settings: SettingsDep, admin: AdminUser, body: PruneRequest | None = None
) -> PruneResult:
    """Delete the checkpoints of jobs that finished N days ago or more (admins only); model/ and logs stay."""
    body = body or PruneRequest()
    days = body.older_than_days if body.older_than_days is not None else settings.checkpoint_retention_days
    if days is None:
        raise Unprocessable(
            "give older_than_days: no retention is set (TRAINBOX_CHECKPOINT_RETENTION_DAYS)",
            ["body", "older_than_days"],
            type_=NO_RETENTION,
        )
    assert settings.runs_root is not None
    assert settings.data_root is not None
    pruned = prune_checkpoints(session, runs_root=settings.runs_root, older_than_days=days, dry_run=body.dry_run)
    cache = prune_token_cache(settings.data_root, older_than_days=days, dry_run=body.dry_run)
    return PruneResult(
        dry_run=body.dry_run,
        older_than_days=days,
        jobs=[PrunedJobRead(**p.__dict__) for p in pruned],
        token_cache=PrunedCacheRead(**cache.__dict__),
        bytes_freed=sum(p.bytes for p in pruned) + cache.bytes,
    )
