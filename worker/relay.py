"""Relay a run's events and log lines to the job's Redis stream, and its step metrics to the database.

The trainer only appends to files (events.jsonl, train.log); the relay tails them incrementally and
publishes each event on the job's stream (core.events). Log lines travel as batched `log` events, so
following a job never needs the run directory.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from redis import Redis
from redis.exceptions import RedisError

from core import events as job_events
from core.disk import tree_bytes
from trainer.events import EVENTS_FILE, LAUNCHER_LOG, LOG_FILE

log = logging.getLogger(__name__)

LOG_LINES_PER_EVENT = 200
MAX_READ_BYTES = 1 << 20

# Called with new step and eval events and job fields learnt from other events (total_steps from `start`);
# writes them to the database in one transaction.
MetricSink = Callable[[list[dict[str, Any]], dict[str, Any]], None]


class FileTail:
    """Incremental reader of an append-only text file: yields whole lines, keeps a partial last line."""

    def __init__(self, path: Path, offset: int = 0) -> None:
        self.path = path
        self.offset = offset
        self._partial = b""

    @property
    def position(self) -> int:
        """Bytes of the file consumed as whole lines (where a later reader should resume)."""
        return self.offset - len(self._partial)

    @classmethod
    def from_end(cls, path: Path) -> FileTail:
        """Start after what the file holds now (a resumed attempt: earlier lines were relayed already)."""
        return cls(path, path.stat().st_size if path.exists() else 0)

    def read_lines(self, max_bytes: int = MAX_READ_BYTES) -> list[str]:
        """New complete lines since the last call."""
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read(max_bytes)
        except FileNotFoundError:
            return []
        if not data:
            return []
        self.offset += len(data)
        data = self._partial + data
        *lines, self._partial = data.split(b"\n")
        return [line.decode("utf-8", "replace").rstrip("\r") for line in lines]


class Relay:
    """Moves one attempt's events, log lines and metrics from its run directory to Redis and the DB."""

    def __init__(
        self,
        *,
        run_dir: Path,
        job_id: str,
        redis: Redis,
        sink: MetricSink,
        stream_cap: int = 10_000,
        flush_s: float = 1.0,
        log_files: tuple[str, ...] = (LOG_FILE, LAUNCHER_LOG),
        offsets_key: str | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.job_id = job_id
        self.redis = redis
        self.sink = sink
        self.stream_cap = stream_cap
        self.flush_s = flush_s
        self.offsets_key = offsets_key
        self.tails = {name: FileTail.from_end(run_dir / name) for name in (EVENTS_FILE, *log_files)}
        self._resume_from_stored_offsets()
        self.events = self.tails[EVENTS_FILE]
        self.logs = [self.tails[name] for name in log_files]
        self.pending_metrics: list[dict[str, Any]] = []
        self.pending_fields: dict[str, Any] = {}
        self.last_flush = time.monotonic()
        self._backlog: list[dict[str, Any]] = []

    def _resume_from_stored_offsets(self) -> None:
        """A later attempt resumes where the last one's relay stopped, so lines written after its last
        publish (its worker died) are relayed now, and nothing published is published twice."""
        if not self.offsets_key:
            return
        try:
            stored = self.redis.hgetall(self.offsets_key)
        except RedisError:
            return
        for raw_name, raw_offset in stored.items():
            name = raw_name.decode() if isinstance(raw_name, bytes) else raw_name
            tail = self.tails.get(name)
            if tail is not None and 0 <= int(raw_offset) <= tail.offset:
                tail.offset = int(raw_offset)

    def publish(self, events: list[dict[str, Any]]) -> None:
        """XADD events in order; if Redis is away, keep them and retry on the next call."""
        self._backlog.extend(events)
        if not self._backlog:
            return
        # The events and how far the files were read go in together (MULTI): a crash between
        # the two would otherwise lose events or repeat them.
        offsets = (self.offsets_key, {name: t.position for name, t in self.tails.items()}) if self.offsets_key else None
        try:
            job_events.publish_many(self.redis, self.job_id, self._backlog, maxlen=self.stream_cap, offsets=offsets)
        except RedisError as exc:
            # Training goes on without Redis; the stream catches up when it is back.
            log.warning("relay: Redis unavailable (%s); %d events held", exc, len(self._backlog))
            return
        self._backlog = []

    def drain(self, timeout_s: float = 30.0, interval_s: float = 0.5) -> bool:
        """At the end of a run, keep offering held events to Redis for a while; True if none is left."""
        deadline = time.monotonic() + timeout_s
        while self._backlog and time.monotonic() < deadline:
            time.sleep(interval_s)
            self.publish([])
        return not self._backlog

    def pump(self, *, final: bool = False) -> int:
        """Relay whatever is new; flush metrics when due (or now if `final`). Returns events relayed."""
        out: list[dict[str, Any]] = []
        checkpointed = False
        for line in self.events.read_lines():
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except ValueError:
                log.warning("relay: skipping a malformed event line: %.200s", line)
                continue
            if not isinstance(event, dict) or "type" not in event:
                continue
            out.append(event)
            if event["type"] in ("step", "eval"):
                self.pending_metrics.append(event)
            elif event["type"] == "start" and isinstance(event.get("total_steps"), int):
                self.pending_fields["total_steps"] = event["total_steps"]
            elif event["type"] == "checkpoint":
                checkpointed = True
        if checkpointed:
            self.measure_disk()  # a checkpoint landed (and older ones went): the job's disk use changed
        lines = [line for tail in self.logs for line in tail.read_lines()]
        for i in range(0, len(lines), LOG_LINES_PER_EVENT):
            out.append({"type": "log", "lines": lines[i : i + LOG_LINES_PER_EVENT], "time": time.time()})
        self.publish(out)
        due = final or time.monotonic() - self.last_flush >= self.flush_s
        if (self.pending_metrics or self.pending_fields) and due:
            self.flush()
        return len(out)

    def measure_disk(self) -> None:
        """Measure the run directory; its size goes to the job (jobs.disk_bytes) with the next flush."""
        self.pending_fields["disk_bytes"] = tree_bytes(self.run_dir)

    def flush(self) -> None:
        """Write the buffered step metrics (and the job's latest/progress) to the database."""
        rows, self.pending_metrics = self.pending_metrics, []
        fields, self.pending_fields = self.pending_fields, {}
        self.last_flush = time.monotonic()
        if not rows and not fields:
            return
        try:
            self.sink(rows, fields)
        except Exception as exc:  # a database blip must not stop the run; retry on the next flush
            log.warning("relay: could not store %d metrics (%s); will retry", len(rows), exc)
            self.pending_metrics = rows + self.pending_metrics
            self.pending_fields = {**fields, **self.pending_fields}
