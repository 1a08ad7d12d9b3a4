"""The job event stream in Redis: how events are written and read back (one field, `data`, of JSON)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from redis import Redis

from core import keys

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
    entry_id = r.xadd(keys.job_events(job_id), encode(event), maxlen=maxlen, approximate=True)  # type: ignore[arg-type]
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
