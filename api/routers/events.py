"""The live event stream of a job: Server-Sent Events read from the job's Redis stream.

Each SSE event's `id` is the Redis stream id, so `Last-Event-ID` resumes exactly after the last
event a client saw. Trainer `step` events are sent as `metric`, `start` and trainer `end` as `state`;
the final `end` event is sent once the job is terminal and the stream is drained, then the
response closes.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from redis.asyncio import Redis
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool

from api.deps import JobDep, RedisDep, SessionDep
from api.errors import Unprocessable, documented
from core import events, keys
from core.models import Job
from core.states import JobState

router = APIRouter(tags=["events"], responses=documented(404, 503))

STREAM_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
BATCH = 200
SSE_NAMES = {"step": "metric", "start": "state", "end": "state"}


def _read_state(request: Request, job_id: str) -> tuple[str, dict[str, Any] | None]:
    with request.app.state.read_sessions() as session:
        job = session.get(Job, job_id)
        return (job.state, job.error) if job else (JobState.CANCELLED.value, None)


def _to_sse(entry_id: Any, fields: dict[Any, Any]) -> ServerSentEvent:
    event = events.decode(fields)
    name = SSE_NAMES.get(str(event.get("type")), str(event.get("type") or "message"))
    eid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    return ServerSentEvent(data=json.dumps(event, separators=(",", ":")), event=name, id=eid)


async def _stream(request: Request, redis: Redis, job_id: str, last_id: str) -> AsyncIterator[ServerSentEvent]:
    key = keys.job_events(job_id)
    block_ms = request.app.state.settings.sse_block_ms

    async def terminal() -> tuple[bool, str, dict[str, Any] | None]:
        state, error = await run_in_threadpool(_read_state, request, job_id)
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
    session: SessionDep,
    request: Request,
    redis: RedisDep,
    last_event_id: Annotated[str | None, Header(max_length=64)] = None,
    after: Annotated[str | None, Query(max_length=64, description="stream id to resume after")] = None,
) -> EventSourceResponse:
    """Live events (`state`, `metric`, `log`, `checkpoint`, `end`); resume with the `Last-Event-ID` header."""
    resume = last_event_id or after or "0-0"
    if not STREAM_ID.match(resume):
        loc = ["header", "Last-Event-ID"] if last_event_id else ["query", "after"]
        raise Unprocessable(f"{resume!r} is not an event id (they look like 1764270000123-0)", loc)
    # A stream can last days: give the request's DB connection back now (the loop opens short sessions).
    await run_in_threadpool(session.close)
    return EventSourceResponse(_stream(request, redis, job.id, resume), ping=15)
