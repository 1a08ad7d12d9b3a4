"""Dependencies: each check written once (`SessionDep`, `CurrentUser`, `JobDep`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from redis.asyncio import Redis
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from api.errors import Forbidden, ServiceUnavailable, Unauthorized
from core.jobs import JobNotFound
from core.models import Job
from core.scheduler import Dispatch
from core.settings import Settings
from core.users import Principal, authenticate


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]


async def get_session(request: Request) -> AsyncIterator[Session]:
    """One session per request; services commit what they change, the rest is rolled back.

    GET requests never write: their sessions take no write lock on SQLite. The session ends with the
    route function, before the response is sent (`scope="function"`): a request gives its connection
    back before it gives back its admission slot, and a stream holds none while it streams.
    Making a session does no I/O, so it is made on the event loop; closing one that used a connection
    (a rollback) runs in the thread pool.
    """
    state = request.app.state
    factory: sessionmaker[Session] = state.read_sessions if request.method in ("GET", "HEAD") else state.sessions
    session = factory()
    try:
        yield session
    finally:
        if session.in_transaction():
            await run_in_threadpool(session.close)
        else:
            session.close()


SessionDep = Annotated[Session, Depends(get_session, scope="function")]


MISSING_TOKEN = "missing bearer token: send `Authorization: Bearer <token>` (trainbox-admin tokens create)"
INVALID_TOKEN = "invalid, revoked or expired token"
_bearer = HTTPBearer(auto_error=False, description="an API token: `trainbox-admin tokens create NAME`")


BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def lookup_token(state: Any, token: str) -> Principal | None:
    """The token's user, from the auth cache (api.authcache: revocation holds within its bound) or one
    indexed look-up in a session of its own (no transaction of the request's is held open by it)."""
    user: Principal | None = state.auth_cache.get(token)
    if user is None:
        with state.read_sessions() as session:
            user = authenticate(session, token, state.settings)
        if user is not None:
            state.auth_cache.put(token, user)
    return user


async def current_user(request: Request, credentials: BearerDep) -> Principal:
    """Who is asking: the user of the `Authorization: Bearer` token; 401 without a valid one."""
    early: Principal | None = getattr(request.state, "principal", None)
    if early is not None:
        return early  # an upload, authenticated before its body was read (api.hardening.AuthFirst)
    if credentials is None:
        raise Unauthorized(MISSING_TOKEN)
    state = request.app.state
    user = state.auth_cache.get(credentials.credentials)
    if user is None:
        user = await run_in_threadpool(lookup_token, state, credentials.credentials)
    if user is None:
        raise Unauthorized(INVALID_TOKEN)
    state.admission.identify(request.scope, user.name)
    return user


CurrentUser = Annotated[Principal, Depends(current_user)]


def require_admin(user: CurrentUser) -> Principal:
    if not user.is_admin:
        raise Forbidden("only an admin may do this", [])
    return user


AdminUser = Annotated[Principal, Depends(require_admin)]

J = TypeVar("J")
JobId = Annotated[str, Path(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_-]+$")]


def visible(job: J | None, job_id: str, user: Principal) -> J:
    """The job (or its row) if the caller owns it or is an admin; 404 otherwise (ids are not confirmed)."""
    if job is None or not user.can_see(job.owner):
        raise JobNotFound(job_id)
    return job


def job_for_user(job_id: JobId, session: SessionDep, user: CurrentUser) -> Job:
    """The job named in the path (see visible)."""
    return visible(session.get(Job, job_id), job_id, user)


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
