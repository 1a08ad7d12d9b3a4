"""The live event stream of a job: Server-Sent Events read from the job's Redis stream.

Each SSE event's `id` is the Redis stream id, so `Last-Event-ID` resumes exactly after the last
event a client saw. Where the stream no longer holds what followed that id (Redis restarted and lost
it, or the cap trimmed it), the missing steps come from the DB's step history first, then the stream
goes on. A DB event's id is `<its time in ms>-<DB_SEQ + step>`: still a valid stream position, and a
resume from it continues by step. A client that also sends `Last-Step` (the SDK
does) resumes by step, exactly. Without it, rows are matched to the Redis id by time, which can miss a
lost step that the trainer wrote before the client's last event reached Redis.

Trainer `step` events are sent as `metric`, `start` and trainer `end` as `state`; the final `end`
event is sent once the job is terminal and the stream is drained, then the response closes.

A quiet stream stays open (a keep-alive comment every PING_S) as long as the client does. While it
streams it holds no DB connection (the request's session ended with the route; the state checks
open short sessions on the streams' own threads) and one Redis connection. A Redis error ends the
stream with one log line; the client resumes with Last-Event-ID.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, TypeVar

import anyio
from fastapi import APIRouter, Depends, Header, Query, Request
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy import select
from sse_starlette import EventSourceResponse, ServerSentEvent

from api.admission import stream_slot
from api.deps import JobDep, RedisDep
from api.errors import Unprocessable, documented
from core import events, keys
from core.models import Job, JobMetric
from core.states import JobState

log = logging.getLogger(__name__)
router = APIRouter(tags=["events"], responses=documented(404, 429, 503))
T = TypeVar("T")

STREAM_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
ID_MAX = 2**64 - 1  # each half of a Redis stream id is an unsigned 64-bit number
STEP_MAX = 2**31 - 1  # job_metrics.step is a 32-bit INTEGER
BATCH = 200
DB_SEQ = 10**12  # DB event ids carry the step above this (Redis's own sequence numbers stay far below)
SSE_NAMES = {"step": "metric", "start": "state", "end": "state"}
PING_S = 10  # keep-alive comment on a quiet stream (proxies drop idle connections)
WARN_EVERY_S = 10.0  # Redis errors of many streams at once: one log line per this, with a count
_warned = {"at": 0.0, "quiet": 0}


async def _in_stream_thread(request: Request, fn: Callable[..., T], *args: Any) -> T:
    """Run a short DB read on the threads every open stream shares (never the request threads)."""
    return await anyio.to_thread.run_sync(fn, request, *args, limiter=request.app.state.admission.stream_db)


def _read_state(request: Request, job_id: str) -> tuple[str, dict[str, Any] | None]:
    with request.app.state.read_sessions() as session:
        job = session.get(Job, job_id)
        return (job.state, job.error) if job else (JobState.CANCELLED.value, None)


def _to_sse(entry_id: Any, fields: dict[Any, Any]) -> ServerSentEvent:
    event = events.decode(fields)
    name = SSE_NAMES.get(str(event.get("type")), str(event.get("type") or "message"))
    eid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    return ServerSentEvent(data=json.dumps(event, separators=(",", ":")), event=name, id=eid)


def _id(stream_id: Any) -> tuple[int, int]:
    ms, _, seq = (stream_id.decode() if isinstance(stream_id, bytes) else str(stream_id)).partition("-")
    return int(ms), int(seq or 0)


def _metrics_after(
    request: Request, job_id: str, after: tuple[int, int], below_step: int | None, last_step: int | None
) -> list[Any]:
    """Step rows after stream position `after` (a DB id, or the client's Last-Step: by step; a Redis id:
    by time), below `below_step`."""
    query = select(JobMetric).where(JobMetric.job_id == job_id)
    if last_step is not None and after[1] < DB_SEQ:
        after = (after[0], DB_SEQ + last_step)
    if after[1] >= DB_SEQ:
        query = query.where(JobMetric.step > min(after[1] - DB_SEQ, STEP_MAX))
    else:
        query = query.where(JobMetric.time >= after[0] / 1000)
    if below_step is not None:
        query = query.where(JobMetric.step < below_step)
    with request.app.state.read_sessions() as session:
        rows = session.scalars(query.order_by(JobMetric.step)).all()
        return [r for r in rows if after[1] >= DB_SEQ or int(r.time * 1000) > after[0]]


async def _lost_steps(
    request: Request, redis: Redis, job_id: str, last_id: str, last_step: int | None
) -> list[ServerSentEvent]:
    """The steps after `last_id` that the stream no longer holds, from the DB ([] when it holds them)."""
    key, after = keys.job_events(job_id), _id(last_id)
    head = await redis.xrange(key, count=1)
    if head and _id(head[0][0]) <= after:
        return []  # the stream still reaches back to the client's position
    first_step, start = None, "-"
    while first_step is None:  # the first step the stream still has: the DB fills in below it
        batch = await redis.xrange(key, min=start, count=BATCH)
        if not batch:
            break
        first_step = next((e["step"] for _i, f in batch if (e := events.decode(f)).get("type") == "step"), None)
        start = "(" + (batch[-1][0].decode() if isinstance(batch[-1][0], bytes) else str(batch[-1][0]))
    rows = await _in_stream_thread(request, _metrics_after, job_id, after, first_step, last_step)
    fields = ("step", "epoch", "loss", "lr", "samples_per_s", "tokens_per_s", "mfu", "gpu_mem_gb", "time")
    return [
        ServerSentEvent(
            data=json.dumps({"type": "step", **{f: getattr(r, f) for f in fields}}, separators=(",", ":")),
            event="metric",
            id=f"{int(r.time * 1000)}-{DB_SEQ + r.step}",
        )
        for r in rows
    ]


async def _stream(
    request: Request, redis: Redis, job_id: str, last_id: str, last_step: int | None
) -> AsyncIterator[ServerSentEvent]:
    """The events; a Redis error ends the stream with a log line (no traceback): the client resumes."""
    try:
        async for sse in _events(request, redis, job_id, last_id, last_step):
            yield sse
    except RedisError as e:
        now = time.monotonic()
        if now - _warned["at"] < WARN_EVERY_S:
            _warned["quiet"] += 1
            return
        quiet, _warned["at"], _warned["quiet"] = _warned["quiet"], now, 0
        more = f" ({quiet} more since the last such line)" if quiet else ""
        log.warning("event stream of job %s ended: Redis: %s: %s; clients resume%s", job_id, type(e).__name__, e, more)


async def _events(
    request: Request, redis: Redis, job_id: str, last_id: str, last_step: int | None
) -> AsyncIterator[ServerSentEvent]:
    key = keys.job_events(job_id)
    block_ms = request.app.state.settings.sse_block_ms
    from_db = await _lost_steps(request, redis, job_id, last_id, last_step)
    for sse in from_db:
        yield sse
    # Steps the relay held while Redis was away reach the stream later; the DB may have sent them already.
    db_step = json.loads(from_db[-1].data)["step"] if from_db else None

    async def terminal() -> tuple[bool, str, dict[str, Any] | None]:
        state, error = await _in_stream_thread(request, _read_state, job_id)
        return JobState(state).is_terminal(), state, error

    done, state, error = await terminal()
    while True:
        # Once the job is terminal, read without blocking: what is left is drained, then the end.
        entries = await redis.xread({key: last_id}, count=BATCH, block=None if done else block_ms)
        if not entries:
            if done:
                end = {"type": "end", "state": state, "error": error}
                yield ServerSentEvent(data=json.dumps(end), event="end", id=last_id)
                return
            if await request.is_disconnected():
                return
            done, state, error = await terminal()
            continue
        saw_state = False
        for _key, items in entries:
            for entry_id, fields in items:
                sse = _to_sse(entry_id, fields)
                last_id = sse.id or last_id
                if db_step is not None and sse.event == "metric" and json.loads(sse.data).get("step", 0) <= db_step:
                    continue
                saw_state = saw_state or sse.event == "state"
                yield sse
        if saw_state and not done:
            done, state, error = await terminal()


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
    last_event_id: Annotated[str | None, Header(max_length=64)] = None,
    after: Annotated[str | None, Query(max_length=64, description="stream id to resume after")] = None,
    last_step: Annotated[
        int | None,
        Header(
            ge=0,
            le=STEP_MAX,
            description="the last step the client received: makes a resume exact where Redis lost events",
        ),
    ] = None,
) -> EventSourceResponse:
    """Live events (`state`, `metric`, `log`, `checkpoint`, `end`); resume with the `Last-Event-ID` header."""
    resume = last_event_id or after or "0-0"
    if not STREAM_ID.match(resume) or max(_id(resume)) > ID_MAX:
        loc = ["header", "Last-Event-ID"] if last_event_id else ["query", "after"]
        raise Unprocessable(f"{resume!r} is not an event id (they look like 1764270000123-0)", loc)
    # The request's DB session has ended with this function (SessionDep); the stream opens short ones.
    return EventSourceResponse(_stream(request, redis, job.id, resume, last_step), ping=PING_S)
