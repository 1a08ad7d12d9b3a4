"""Who am I (GET /users/me), and an admin's per-user limits (GET /users, PATCH /users/{name})."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.deps import AdminUser, CurrentUser, SessionDep, SettingsDep
from api.errors import NotFound, documented
from api.schemas import DiskUsageRead, LimitsRead, UserRead
from core import users as service
from core.disk import DiskUsage, disk_usage, disk_usage_by_owner
from core.models import User
from core.users import Limits, Principal
from trainer.spec import whole_number

router = APIRouter(prefix="/users", tags=["users"])

UserName = Annotated[str, Path(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]*$")]


class LimitsUpdate(BaseModel):
    """Per-user overrides; a field set to null goes back to the server's setting, an absent one is kept."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _json_integers(cls, v: Any) -> Any:
        # The schema says integer: 5 or 5.0, not `false` or "5" (lax mode took false as a limit of 0).
        return v if v is None else whole_number(v)

    max_gpus: int | None = Field(None, ge=1, le=1024)
    max_queued: int | None = Field(None, ge=1, le=100_000)
    max_runtime_s: int | None = Field(None, ge=1, le=365 * 86400)
    max_priority: int | None = Field(None, ge=-100, le=100)
    submit_rate_per_minute: int | None = Field(None, ge=1, le=100_000)
    max_datasets: int | None = Field(None, ge=1, le=1_000_000)
    max_dataset_bytes: int | None = Field(None, ge=1, le=1 << 50)
    max_tokens: int | None = Field(None, ge=1, le=10_000)
    max_disk_bytes: int | None = Field(None, ge=1, le=1 << 50)


def _read(user: User | Principal, limits: Limits, disk: DiskUsage | None = None) -> UserRead:
    use = DiskUsageRead(**vars(disk), total_bytes=disk.total_bytes) if disk else None
    return UserRead(name=user.name, is_admin=user.is_admin, limits=LimitsRead(**vars(limits)), disk=use)


@router.get("/me", response_model=UserRead)
def me(user: CurrentUser, session: SessionDep) -> UserRead:
    """The caller: name, admin or not, the limits in force for them and the disk they use."""
    return _read(user, user.limits, disk_usage(session, user.name))


@router.get("", response_model=list[UserRead], responses=documented(403))
def list_users(session: SessionDep, settings: SettingsDep, admin: AdminUser) -> list[UserRead]:
    """Every user, their limits and the disk they use (admins only)."""
    usage = disk_usage_by_owner(session)
    return [
        _read(u, service.effective_limits(u, settings), usage.get(u.name, DiskUsage()))
        for u in service.list_users(session)
    ]


@router.patch("/{name}", response_model=UserRead, responses=documented(403, 404, 413))
def set_limits(
    name: UserName, body: LimitsUpdate, session: SessionDep, settings: SettingsDep, admin: AdminUser, request: Request
) -> UserRead:
    """Set a user's limits (admins only)."""
    try:
        user = service.set_limits(session, name=name, **body.model_dump(exclude_unset=True))
    except service.UserError as e:
        raise NotFound(str(e), ["path", "name"]) from None
    request.app.state.auth_cache.clear()  # cached principals carry the limits
    return _read(user, service.effective_limits(user, settings))
