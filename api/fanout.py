"""One reader of a job's event stream per API process, shared by every open stream of that job.

Why: when each open stream did its own blocking XREAD and decoded and encoded every event itself,
the API's cost was per follower x event (0.24 ms of CPU per message per follower with 100 followers,
docs/BENCHMARKS.md section 7), and the GETs of everyone else paid for it. A job's reader XREADs once,
decodes each event once and encodes its SSE message once; it keeps the last BUFFER of them, and every
follower of the job sends from there.

A follower comes with its own position (api/routers/events.py: the resume protocol). It reads from
there itself, with non-blocking XREADs, until the reader's buffer reaches back to its position (or, with
no reader, up to the stream's end, where it starts one); then it follows the buffer. One that falls
behind the buffer (a slow client) goes back to its own reads from where it is, so nothing is lost or
repeated. The reader also reads the job's state for all of them (at its start, on a `state` or `end`
event, after a quiet block), and once the job is terminal and the stream drained, it ends and so do
its followers. It stops when its last follower leaves. A Redis error ends it, and each of its
followers' streams with that error (the clients resume); the next follower starts a new reader.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from sse_starlette import ServerSentEvent

from core import events, keys

BATCH = 200
BUFFER = 1000  # events a reader keeps for its followers; one further behind reads for itself
BUFFER_BYTES = 16 * 2**20  # and at most this much of them (log events carry up to 200 lines each)
# The job's state as the reader last read it: (terminal, state, error).
ReadState = Callable[[str], Awaitable[tuple[bool, str, dict[str, Any] | None]]]


def stream_id(entry_id: Any) -> str:
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


def id_key(position: str) -> tuple[int, int]:
    ms, _, seq = position.partition("-")
    return int(ms), int(seq or 0)


def message(event: dict[str, Any], position: str, step: int) -> bytes:
    """One SSE message: named by the event's type, its id `<stream id>:<last step sent>`."""
    return Entry.of(position, event, step).message(step)


@dataclass(frozen=True, slots=True)
class Entry:
    """A stream entry, decoded and encoded once, as every follower sends it."""

    position: str
    key: tuple[int, int]
    step: int | None  # a step event's step (-1 where it has none: never sent); None for other events
    name: str
    data: str
    wire_step: int  # `wire` is the message for a follower whose last step is this one
    wire: bytes

    @property
    def size(self) -> int:
        return len(self.data) + len(self.wire)

    @classmethod
    def of(cls, position: str, event: dict[str, Any], step: int) -> Entry:
        """The entry after `step`, the last step its reader sent before it."""
        new_step = None
        if event.get("type") == "step":
            new_step = event["step"] if isinstance(event.get("step"), int) else -1
            step = max(step, new_step)
        name, data = str(event.get("type") or "message"), json.dumps(event, separators=(",", ":"))
        wire = ServerSentEvent(data=data, event=name, id=f"{position}:{step}").encode()
        return cls(position, id_key(position), new_step, name, data, step, wire)

    def message(self, step: int) -> bytes:
        if step == self.wire_step:
            return self.wire
        return ServerSentEvent(data=self.data, event=self.name, id=f"{self.position}:{step}").encode()

    def send(self, step: int) -> tuple[bytes | None, int]:
        """(the message for a follower whose last step is `step`, or None to skip it; its step after)."""
        if self.step is not None:
            # Steps already sent (or refilled from the DB) are not sent again: the relay re-sends what it
            # held while Redis was away.
            if self.step <= step:
                return None, step
            step = self.step
        return self.message(step), step


class Reader:
    """The one XREAD loop of a job: its last BUFFER entries, and the job's state for its followers."""

    def __init__(self, fanout: Fanout, job_id: str, start: str, step: int) -> None:
        self.fanout, self.job_id = fanout, job_id
        self.start = id_key(start)  # the buffer and what the reader reads next hold every entry after this
        self.position, self.step = start, step
        self.buffer: deque[Entry] = deque()
        self.end = 0  # the number of entries read; the buffer holds numbers end - len(buffer) .. end - 1
        self.bytes = 0  # what the buffer holds
        self.followers = 0
        self.ended: tuple[str, dict[str, Any] | None] | None = None  # (state, error) once terminal and drained
        self.failed: Exception | None = None  # what ended it otherwise (a Redis error): its followers raise it
        self.wake = asyncio.Event()  # set (and replaced) whenever there is something new for the followers
        self.task = asyncio.create_task(self._run(), name=f"events of job {job_id}")

    @property
    def first(self) -> int:
        return self.end - len(self.buffer)

    def after(self, key: tuple[int, int]) -> int:
        """The number of the first buffered entry after `key`."""
        i = self.end
        while i > self.first and self.buffer[i - 1 - self.first].key > key:
            i -= 1
        return i

    def _notify(self) -> None:
        self.wake.set()
        self.wake = asyncio.Event()

    async def _run(self) -> None:
        try:
            await self._read()
        except Exception as e:  # noqa: BLE001 - each follower ends its stream with it (a RedisError: resume)
            self.failed = e
        finally:
            if self.ended is None and self.failed is None:  # cancelled (its last follower left, or shutdown)
                self.failed = RedisConnectionError("the job's event reader stopped")
            self.fanout.forget(self)
            self._notify()

    async def _read(self) -> None:
        key, fanout = keys.job_events(self.job_id), self.fanout
        done, state, error = await fanout.read_state(self.job_id)
        while True:
            # Once the job is terminal, read without blocking: what is left is drained, then the end.
            entries = await fanout.redis.xread(
                {key: self.position}, count=BATCH, block=None if done else fanout.block_ms
            )
            if not entries:
                if done:
                    self.ended = (state, error)
                    return
                done, state, error = await fanout.read_state(self.job_id)
                self._notify()  # quiet: followers see whether their client is still there
                continue
            saw_state = False
            for _key, items in entries:
                for entry_id, raw in items:
                    event = events.decode(raw)
                    entry = Entry.of(stream_id(entry_id), event, self.step)
                    self.buffer.append(entry)
                    self.bytes += entry.size
                    while len(self.buffer) > BUFFER or (self.bytes > BUFFER_BYTES and len(self.buffer) > 1):
                        old = self.buffer.popleft()
                        self.bytes -= old.size
                        self.start = old.key
                    self.end += 1
                    self.position, self.step = entry.position, entry.wire_step
                    saw_state = saw_state or event.get("type") in ("state", "end")
            self._notify()
            if saw_state and not done:
                done, state, error = await fanout.read_state(self.job_id)


class Fanout:
    """The readers of one API process, one per job that has followers."""

    def __init__(self, redis: Redis, block_ms: int, read_state: ReadState) -> None:
        self.redis, self.block_ms, self.read_state = redis, block_ms, read_state
        self.readers: dict[str, Reader] = {}

    def forget(self, reader: Reader) -> None:
        if self.readers.get(reader.job_id) is reader:
            del self.readers[reader.job_id]

    async def _join(self, job_id: str, position: str, step: int, *, start: bool) -> Reader | None:
        """The job's reader if it holds everything after `position`; with `start`, one started here if
        the job has none (the caller is at the stream's end)."""
        reader = self.readers.get(job_id)
        if reader is None and start:
            # Not past the stream's last entry: a client's made-up position must not hide newer events
            # from the reader's other followers.
            last = await self.redis.xrevrange(keys.job_events(job_id), count=1)
            end = stream_id(last[0][0]) if last else "0-0"
            if id_key(end) < id_key(position):
                position = end
            reader = self.readers.get(job_id)  # another follower may have started one meanwhile
            if reader is None:
                reader = self.readers[job_id] = Reader(self, job_id, position, step)
        if reader is None or reader.start > id_key(position):
            return None
        reader.followers += 1
        return reader

    def _leave(self, reader: Reader) -> None:
        reader.followers -= 1
        if reader.followers == 0:
            self.forget(reader)
            reader.task.cancel()

    async def follow(
        self, job_id: str, position: str, step: int, is_disconnected: Callable[[], Awaitable[bool]]
    ) -> AsyncIterator[bytes]:
        """The job's SSE messages after `position`, no step at or below `step`, then the `end`. Raises RedisError."""
        key = keys.job_events(job_id)
        while True:
            # Reads of its own until it can join the reader; once one came short of a batch (the stream's
            # end), it may start the reader, and a next read (a reader ahead of a lost stream) waits for news.
            stalled = False
            while (reader := await self._join(job_id, position, step, start=stalled)) is None:
                entries = await self.redis.xread({key: position}, count=BATCH, block=self.block_ms if stalled else None)
                items = entries[0][1] if entries else []
                for entry_id, raw in items:
                    position = stream_id(entry_id)
                    msg, step = Entry.of(position, events.decode(raw), step).send(step)
                    if msg is not None:
                        yield msg
                stalled = len(items) < BATCH
            try:
                after = id_key(position)
                cursor = reader.after(after)
                while cursor >= reader.first:  # else it fell behind the buffer: back to its own reads
                    if cursor < reader.end:
                        entry = reader.buffer[cursor - reader.first]
                        cursor += 1
                        if entry.key > after:  # the reader may be behind a follower that read for itself
                            position = entry.position
                            msg, step = entry.send(step)
                            if msg is not None:
                                yield msg
                    elif reader.failed is not None:
                        # A fresh error per follower (one shared object's traceback would grow with each).
                        raise RedisError(f"{type(reader.failed).__name__}: {reader.failed}") from reader.failed
                    elif reader.ended is not None:
                        state, error = reader.ended
                        yield message({"type": "end", "state": state, "error": error}, position, step)
                        return
                    else:
                        await reader.wake.wait()
                        if cursor == reader.end and await is_disconnected():
                            return
            finally:
                self._leave(reader)
