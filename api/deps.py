"""Dependencies: each check written once (`SessionDep`, `CurrentUser`, `JobDep`)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Path, Request
from redis.asyncio import Redis
from sqlalchemy.orm import Session, sessionmaker

from api.errors import ServiceUnavailable, Unprocessable
from core.jobs import get_job
from core.models import Job
from core.scheduler import Dispatch
from core.settings import Settings

_USER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,99}$")


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]


def get_session(request: Request) -> Iterator[Session]:
    """One session per request; services commit what they change, the rest is rolled back.

    GET requests never write: their sessions take no write lock on SQLite.
    """
    state = request.app.state
    factory: sessionmaker[Session] = state.read_sessions if request.method in ("GET", "HEAD") else state.sessions
    with factory() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def current_user(x_trainbox_user: Annotated[str | None, Header()] = None) -> str:
    """Who is asking. Until users and tokens exist: the X-Trainbox-User header, default "local"."""
    user = x_trainbox_user or "local"
    if not _USER.match(user):
        raise Unprocessable("user names are 1-100 letters, digits, '.', '_', '@' or '-'", ["header", "X-Trainbox-User"])
    return user


CurrentUser = Annotated[str, Depends(current_user)]

JobId = Annotated[str, Path(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_-]+$")]


def job_for_user(job_id: JobId, session: SessionDep, user: CurrentUser) -> Job:
    """The job named in the path (404 if there is none); ownership checks go here."""
    return get_job(session, job_id)


JobDep = Annotated[Job, Depends(job_for_user)]


def get_redis(request: Request) -> Redis:
    redis: Redis | None = request.app.state.redis
    if redis is None:
        raise ServiceUnavailable("no Redis is configured (TRAINBOX_REDIS_URL); live events are unavailable")
    return redis


RedisDep = Annotated[Redis, Depends(get_redis)]


def get_dispatch(request: Request) -> Dispatch | None:
    return request.app.state.dispatch


DispatchDep = Annotated[Dispatch | None, Depends(get_dispatch)]
