"""The FastAPI application: `create_app(settings)` for tests and embedding, `app` for uvicorn.

uvicorn api.app:app          (settings from TRAINBOX_* environment variables)
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from api import dashboard, errors
from api import openai as openai_view
from api.admission import Admission, AdmissionControl, db_pool_size, redis_pool_size
from api.authcache import AuthCache
from api.deps import current_user
from api.errors import documented
from api.hardening import AuthFirst, RequestLimits, SecurityHeaders
from api.observability import MetricsMiddleware, make_registry
from api.routers import admin, datasets, events, files, jobs, overview, system, tokens, users
from core import events as job_events
from core.db import make_engine, make_sessionmaker, read_only_engine
from core.lifecycle import announcing
from core.scheduler import Dispatch
from core.settings import Settings, get_settings

log = logging.getLogger(__name__)

_DEFAULT = object()


def create_app(settings: Settings | None = None, *, dispatch: Dispatch | None | Any = _DEFAULT) -> FastAPI:
    """Build the app. `dispatch` sends run_job to a box (default: Celery over the settings' Redis)."""
    settings = settings or get_settings()
    # Sized from the admission caps (api/admission.py): an admitted request never waits for a connection.
    engine = make_engine(settings.database_url, pool_size=db_pool_size(settings), max_overflow=0)
    sync_redis = (
        SyncRedis.from_url(settings.redis_url, socket_timeout=5, retry=job_events.reconnecting())
        if settings.redis_url
        else None
    )
    if dispatch is _DEFAULT:
        from core.dispatch import celery_dispatcher

        dispatch = celery_dispatcher(settings.redis_url) if settings.redis_url else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The async client belongs to the server's event loop: made here, closed here.
        app.state.redis = async_redis(settings)
        app.state.fanout = events.make_fanout(app, app.state.redis) if app.state.redis is not None else None
        try:
            yield
        finally:
            if app.state.redis is not None:
                await app.state.redis.aclose()
            app.state.redis = app.state.fanout = None

    app = FastAPI(
        title="trainbox",
        version="0.1.0",
        summary="Share one multi-GPU box for LLM training: submit, schedule, run and follow DeepSpeed jobs.",
        lifespan=lifespan,
        # Swagger UI and ReDoc load their scripts from a CDN, which an offline box cannot reach, and no
        # installed package carries them: /openapi.json (public) is the API's description; any viewer reads it.
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessions = make_sessionmaker(engine)
    app.state.read_engine = read_only_engine(engine)
    app.state.read_sessions = make_sessionmaker(app.state.read_engine)
    app.state.redis = app.state.fanout = None
    app.state.sync_redis = sync_redis
    app.state.publish = job_events.publisher(sync_redis, maxlen=settings.stream_maxlen)
    app.state.dispatch = announcing(dispatch, app.state.publish)
    registry, requests, latency = make_registry(app.state.read_sessions)
    app.state.registry = registry
    app.state.admission = Admission(settings)
    app.state.auth_cache = AuthCache(settings.auth_cache_s)
    upload_paths = frozenset({"/datasets", openai_view.UPLOAD_PATH})
    # The last added runs first: metrics, headers, admission, upload auth, body limits, the routes.
    app.add_middleware(
        RequestLimits,
        max_body=settings.max_body_bytes,
        max_upload=settings.max_upload_bytes,
        max_depth=settings.max_json_depth,
        upload_paths=upload_paths,
    )
    app.add_middleware(AuthFirst, upload_paths=upload_paths)
    app.add_middleware(AdmissionControl, admission=app.state.admission)
    app.add_middleware(SecurityHeaders)
    app.add_middleware(MetricsMiddleware, requests=requests, latency=latency)
    # Outermost: every /v1 error, from a route or a middleware, leaves in OpenAI's envelope.
    app.add_middleware(openai_view.OpenAIErrors)
    errors.install(app)
    # Everything but /healthz, the dashboard (its page and /static files) and (by setting) /metrics needs a token.
    for module in (jobs, events, files, datasets, users, tokens, admin, overview):
        app.include_router(module.router, dependencies=[Depends(current_user)], responses=documented(401))
    for router in openai_view.routers:
        app.include_router(router, dependencies=[Depends(current_user)])
    app.include_router(system.router)
    app.include_router(dashboard.router)  # the page's static files (public)
    return app


def async_redis(settings: Settings) -> Redis | None:
    """The API's async Redis client. Its read timeout outlasts an SSE poll's XREAD BLOCK (redis-py's
    default of 5 s equalled the default block and cut every quiet stream); its pool holds every open stream."""
    if not settings.redis_url:
        return None
    return Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.sse_block_ms / 1000 + 5,
        socket_connect_timeout=5,
        max_connections=redis_pool_size(settings),
        client_name="trainbox-api",
    )


_app: FastAPI | None = None


def __getattr__(name: str) -> Any:
    # `app` is built on first access, so importing this module has no side effects.
    global _app
    if name == "app":
        if _app is None:
            _app = create_app()
        return _app
    raise AttributeError(name)
