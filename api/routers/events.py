"""The live event stream of a job: Server-Sent Events read from the job's Redis stream.

Resuming (one protocol, for every client): each event's `id` is `<stream id>:<step>`, the Redis stream
position of the event and the last step sent up to and including it. A client resumes by sending the
last id it saw as `Last-Event-ID` (or `?after=`; a browser's EventSource does this by itself). The
server sends what the stream holds after that position, never a step at or below that step; where
the stream no longer reaches back to the position (Redis restarted and lost it, or the cap trimmed
it), the missing steps come from the DB's step history first, by step, so nothing is lost or repeated.
A client that already has the history (the dashboard loads it from /metrics) asks for `0-0:<its last
step>`: the stream's other events, and only newer steps.

Each event is named on the wire by its own `type` (`state`, `start`, `step`, `eval`, `checkpoint`,
`log`, `end`); the final `end`, with the job's terminal `state`, comes once the job is terminal and
the stream is drained, then the response closes.

A quiet stream stays open (a keep-alive comment every PING_S) as long as the client does. While it
streams it holds no DB connection (the request's session ended with the route; the state checks
open short sessions on the streams' own threads), and once caught up no Redis connection of its own:
the job's one reader (api/fanout.py) reads for all its followers. A Redis error ends the stream with
one log line; the client resumes with Last-Event-ID.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, TypeVar

import anyio
from fastapi import APIRouter, Depends, Header, Query, Request
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from sqlalchemy import select
from sse_starlette import EventSourceResponse

from api.admission import stream_slot
from api.deps import JobDep, RedisDep
from api.errors import Unprocessable, documented
from api.fanout import BATCH, Fanout, id_key, message, stream_id
from core import events, keys
from core.models import Job, JobMetric
from core.states import JobState

log = logging.getLogger(__name__)
router = APIRouter(tags=["events"], responses=documented(404, 429, 503))
T = TypeVar("T")

RESUME_ID = re.compile(r"^(\d{1,20})-(\d{1,20}):(\d{1,10})$")
ID_MAX = 2**64 - 1  # each half of a Redis stream id is an unsigned 64-bit number
STEP_MAX = 2**31 - 1  # job_metrics.step is a 32-bit INTEGER
# A refilled step event carries what its history row holds (every column but the keys).
STEP_ROW_FIELDS = tuple(c.name for c in JobMetric.__table__.columns if c.name not in ("id", "job_id", "attempt"))
PING_S = 10  # keep-alive comment on a quiet stream (proxies drop idle connections)
WARN_EVERY_S = 10.0  # Redis errors of many streams at once: one log line per this, with a count
_warned = {"at": 0.0, "quiet": 0}


async def _in_stream_thread(app: Any, fn: Callable[..., T], *args: Any) -> T:
    """Run a short DB read on the threads every open stream shares (never the request threads)."""
    return await anyio.to_thread.run_sync(fn, app, *args, limiter=app.state.admission.stream_db)


def _read_state(app: Any, job_id: str) -> tuple[bool, str, dict[str, Any] | None]:
    with app.state.read_sessions() as session:
        job = session.get(Job, job_id)
        state, error = (job.state, job.error) if job else (JobState.CANCELLED.value, None)
        return JobState(state).is_terminal(), state, error


def make_fanout(app: Any, redis: Redis) -> Fanout:
    """The app's fan-out over its async Redis client (made with it, in the app's lifespan)."""
    return Fanout(redis, app.state.settings.sse_block_ms, functools.partial(_in_stream_thread, app, _read_state))


def _metrics_after(app: Any, job_id: str, after_step: int, below_step: int | None) -> list[Any]:
    """Step rows after `after_step` (and below `below_step`, where the stream takes over), by step."""
    query = select(JobMetric).where(JobMetric.job_id == job_id, JobMetric.step > after_step)
    if below_step is not None:
        query = query.where(JobMetric.step < below_step)
    with app.state.read_sessions() as session:
        return list(session.scalars(query.order_by(JobMetric.step)).all())


async def _lost_steps(request: Request, redis: Redis, job_id: str, position: str, step: int) -> list[Any]:
    """The step rows after `step` that the stream no longer holds past `position` ([] when it does)."""
    key = keys.job_events(job_id)
    try:
        head = await redis.xrange(key, count=1)
    except RedisConnectionError:
        # The stream's first command: a Redis restart closed the pool's idle connections. Drop them and
        # ask once more on a new one (safe: nothing was read yet). Later reads are not retried: a read
        # from a position after a reconnect would skip what the restarted Redis lost; the stream ends
        # instead, and the client's resume gets those steps from the DB.
        await redis.connection_pool.disconnect(inuse_connections=False)
        head = await redis.xrange(key, count=1)
    if head and id_key(stream_id(head[0][0])) <= id_key(position):
        return []  # the stream still reaches back to the client's position
    first_step, start = None, "-"
    while first_step is None:  # the first step the stream still has: the DB fills in below it
        batch = await redis.xrange(key, min=start, count=BATCH)
        if not batch:
            break
        first_step = next((e["step"] for _i, f in batch if (e := events.decode(f)).get("type") == "step"), None)
        start = "(" + stream_id(batch[-1][0])
    return await _in_stream_thread(request.app, _metrics_after, job_id, step, first_step)


async def _stream(request: Request, redis: Redis, job_id: str, position: str, step: int) -> AsyncIterator[bytes]:
    """The events; a Redis error ends the stream with a log line (no traceback): the client resumes."""
    try:
        async for sse in _events(request, redis, job_id, position, step):
            yield sse
    except RedisError as e:
        now = time.monotonic()
        if now - _warned["at"] < WARN_EVERY_S:
            _warned["quiet"] += 1
            return
        quiet, _warned["at"], _warned["quiet"] = _warned["quiet"], now, 0
        more = f" ({quiet} more since the last such line)" if quiet else ""
        log.warning("event stream of job %s ended: Redis: %s: %s; clients resume%s", job_id, type(e).__name__, e, more)


async def _events(request: Request, redis: Redis, job_id: str, position: str, step: int) -> AsyncIterator[bytes]:
    """The steps the stream lost, from the DB; then the stream, through the job's shared reader (api/fanout.py)."""
    for row in await _lost_steps(request, redis, job_id, position, step):
        step = row.step
        yield message({"type": "step", **{f: getattr(row, f) for f in STEP_ROW_FIELDS}}, position, step)
    async for sse in request.app.state.fanout.follow(job_id, position, step, request.is_disconnected):
        yield sse


@router.get(
    "/jobs/{job_id}/events",
    response_class=EventSourceResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events"}},
)
async def job_events(
    job: JobDep,
    request: Request,
    redis: RedisDep,
    _stream_slot: Annotated[None, Depends(stream_slot)],
    last_event_id: Annotated[
        str | None, Header(max_length=64, description="the last event id received: resume after it")
    ] = None,
    after: Annotated[
        str | None, Query(max_length=64, description="an event id to resume after (the same as Last-Event-ID)")
    ] = None,
) -> EventSourceResponse:
    """Live events (`state`, `start`, `step`, `eval`, `checkpoint`, `log`, `end`); resume with `Last-Event-ID`.

    Event ids are `<stream id>:<step>` (for example `1764270000123-0:120`): the stream position and
    the last step sent. Resuming after one sends no step twice and none is lost, even where Redis lost
    events (the steps then come from the step history). `0-0:N` starts at the beginning but skips
    steps up to N (for a client that already has the history)."""
    resume = last_event_id or after or "0-0:0"
    match = RESUME_ID.match(resume)
    if not match or max(int(match[1]), int(match[2])) > ID_MAX or int(match[3]) > STEP_MAX:
        loc = ["header", "Last-Event-ID"] if last_event_id else ["query", "after"]
        raise Unprocessable(f"{resume!r} is not an event id (they look like 1764270000123-0:120)", loc)
    position, step = f"{match[1]}-{match[2]}", int(match[3])
    # The request's DB session has ended with this function (SessionDep); the stream opens short ones.
    return EventSourceResponse(_stream(request, redis, job.id, position, step), ping=PING_S)
