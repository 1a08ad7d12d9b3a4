"""The job event stream in Redis: the one place that writes it (the API, the scheduler, the worker's
relay, the reaper) and reads an entry back. Each entry is one field, `data`, holding the event's JSON."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from redis import Redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.retry import Retry

from core import keys

log = logging.getLogger(__name__)

# Publishes one event on a job's stream, best effort (the DB holds the state): (job id, event).
Publish = Callable[[str, dict[str, Any]], None]


def encode(event: dict[str, Any]) -> dict[str, str]:
    return {keys.EVENT_FIELD: json.dumps(event, separators=(",", ":"))}


def decode(fields: dict[Any, Any]) -> dict[str, Any]:
    """An entry's event; tolerant of bytes and of entries written field by field."""
    norm = {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in fields.items()
    }
    raw = norm.get(keys.EVENT_FIELD)
    if raw is not None:
        try:
            value = json.loads(raw)
        except ValueError:
            return {"type": "message", "text": raw}
        return value if isinstance(value, dict) else {"type": "message", "value": value}
    return norm


def publish(r: Redis, job_id: str, event: dict[str, Any], *, maxlen: int) -> str:
    """XADD one event to the job's stream (capped, approximately, at `maxlen`); returns its stream id."""
    return publish_many(r, job_id, [event], maxlen=maxlen)[0]


def publish_many(
    r: Redis,
    job_id: str,
    events: Sequence[dict[str, Any]],
    *,
    maxlen: int,
    offsets: tuple[str, Mapping[str, int]] | None = None,
) -> list[str]:
    """XADD events in order in one round trip; with `offsets` (a hash key and its fields: how far the
    producer has read), the hash is set in the same MULTI, so a crash loses or repeats nothing. Raises RedisError."""
    pipe = r.pipeline(transaction=offsets is not None)
    for event in events:
        pipe.xadd(keys.job_events(job_id), encode(event), maxlen=maxlen, approximate=True)  # type: ignore[arg-type]
    if offsets is not None:
        pipe.hset(offsets[0], mapping=dict(offsets[1]))
    replies = pipe.execute()[: len(events)]
    return [i.decode() if isinstance(i, bytes) else str(i) for i in replies]


def publisher(r: Redis | None, *, maxlen: int) -> Publish:
    """A best-effort `Publish` over `r` (None: publishes nothing): stamps the event's time if it has none;
    a Redis error is logged, since the DB holds the state and the stream only tells followers sooner."""

    def publish_one(job_id: str, event: dict[str, Any]) -> None:
        if r is None:
            return
        try:
            publish(r, job_id, {"time": time.time(), **event}, maxlen=maxlen)
        except RedisError as e:
            log.warning("could not publish %s for job %s: %s", event.get("type"), job_id, e)

    return publish_one


def settings_publisher() -> Publish:
    """The publisher for this process's settings (the worker's; the API builds its own from its settings)."""
    from core.settings import get_settings

    settings = get_settings()
    return publisher(_redis(settings.redis_url) if settings.redis_url else None, maxlen=settings.stream_maxlen)


def reconnecting() -> Retry:
    """The retry policy (`retry=` of Redis.from_url) of clients whose commands stand alone (the publishers,
    the submit rate): a command that finds its pooled connection closed is sent again on a new one. A Redis
    restart closes every idle pooled connection, and redis-py's from_url clients retry nothing, so the first
    command on each failed ("Connection closed by server"). Not for the event stream's reads: a read from a
    position, sent again after a reconnect, would skip what the restarted Redis lost (api/routers/events.py
    retries only a stream's first read). Timeouts are not retried: a server that does not
    answer in time is not helped by asking again (a blocking read would wait its timeout thrice). A write
    whose connection broke after it was sent may land twice: followers skip a repeated step, and the other
    events say the same thing again."""
    return Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=2, supported_errors=(RedisConnectionError,))


_clients: dict[str, Redis] = {}


def _redis(url: str) -> Redis:
    """One client (and connection pool) per URL for the process."""
    if url not in _clients:
        _clients[url] = Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5, retry=reconnecting())
    return _clients[url]
