"""A small Python client for the trainbox HTTP API (httpx).

`Client(url, token)` wraps each endpoint (submit, validate, list, get, cancel, metrics, logs, gpus);
`Client.events(job_id)` iterates the job's Server-Sent Events and resumes with Last-Event-ID."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})


class TrainboxError(Exception):
    """An error answer from the API; `detail` is the API's error list."""

    def __init__(self, status_code: int, detail: Any) -> None:
        self.status_code = status_code
        self.detail = detail
        super().__init__(f"HTTP {status_code}: {format_detail(detail)}")


def format_detail(detail: Any, hint: Callable[[dict[str, Any]], str | None] = lambda item: None) -> str:
    """The API's `{"detail": [{"loc", "msg", "type"}]}` as one readable line (each item with its `hint`)."""
    if not isinstance(detail, list):
        return str(detail)
    parts = []
    for item in detail:
        if not isinstance(item, dict):
            parts.append(str(item))
            continue
        loc = ".".join(str(p) for p in item.get("loc") or [] if p != "body")
        line = f"{loc}: {item.get('msg')}" if loc else str(item.get("msg"))
        parts.append(f"{line} ({extra})" if (extra := hint(item)) else line)
    return "; ".join(parts)


@dataclass(frozen=True)
class Event:
    """One Server-Sent Event: its stream id, its type and its JSON payload."""

    id: str | None
    type: str
    data: dict[str, Any]


def parse_sse(lines: Iterator[str]) -> Iterator[tuple[str | None, str | None, str]]:
    """Yield (id, event, data) for each dispatched SSE message (the WHATWG event-stream rules)."""
    event_id: str | None = None
    event_type: str | None = None
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                yield event_id, event_type, "\n".join(data)
            event_type, data = None, []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name == "event":
            event_type = value
        elif name == "id" and "\x00" not in value:
            event_id = value


BUSY_RETRIES = 3
RESTARTING_STATUSES = frozenset({502, 503, 504})  # a proxy or the server itself on its way down or back
RECONNECT_FOR_S = 120.0  # a follower keeps trying this long through a server restart, then raises
BUSY_MAX_WAIT_S = 5.0
# The server sends a keep-alive comment every 10 s on a quiet stream: this long without a byte means a
# dead connection (a server that vanished without closing it), and the follower reconnects.
STREAM_SILENCE_S = 60.0


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds to wait before retrying a 429/503 that asked for a short wait; None otherwise."""
    if response.status_code not in (429, 503):
        return None
    try:
        wait = float(response.headers.get("Retry-After", ""))
    except ValueError:
        return None
    return wait if 0 <= wait <= BUSY_MAX_WAIT_S else None


class Client:
    """Synchronous client; the base URL and token default to TRAINBOX_URL and TRAINBOX_TOKEN."""

    def __init__(self, base_url: str | None = None, token: str | None = None, timeout: float = 30.0) -> None:
        self.base_url = (base_url or os.environ.get("TRAINBOX_URL") or DEFAULT_URL).rstrip("/")
        token = token if token is not None else os.environ.get("TRAINBOX_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    @classmethod
    def discover(cls, timeout: float = 30.0) -> Client:
        """A client for the server and token the CLI would use: TRAINBOX_URL/TRAINBOX_TOKEN, then
        `trainbox login`'s, then the running `trainbox up`'s (client.config; docs/CLI.md)."""
        from client.config import check_url, resolve  # client.config imports this module

        found = resolve()
        return cls(check_url(found.url, found.url_source), found.token or "", timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.http.request(method, path, **kwargs)
        # A busy server (503) or a user over their share of it (429) says when to come back: a short
        # wait is taken here, a few times. Longer ones (the submit rate limit) and uploads (their
        # body is a stream already sent) go to the caller.
        for _ in range(BUSY_RETRIES):
            wait = _retry_after(response)
            if wait is None or "files" in kwargs or "content" in kwargs:
                break
            time.sleep(wait)
            response = self.http.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise TrainboxError(response.status_code, _detail(response))
        if "application/json" in response.headers.get("content-type", ""):
            return response.json()
        return response.text

    def health(self) -> dict[str, Any]:
        """GET /healthz."""
        return self._call("GET", "/healthz")

    def submit(self, spec: dict[str, Any], *, idempotency_key: str | None = None) -> dict[str, Any]:
        """Submit a JobSpec; returns the job (state `queued`)."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._call("POST", "/jobs", json=spec, headers=headers)

    def validate(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Dry-run a JobSpec: resolved DeepSpeed config, world size, memory estimate, queue position."""
        return self._call("POST", "/jobs/validate", json=spec)

    def list(
        self,
        *,
        state: str | None = None,
        owner: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        """One page of jobs, newest first: `{"data": [...], "next_cursor": ...}`."""
        query = {"state": state, "owner": owner, "limit": limit, "cursor": cursor}
        params = {k: v for k, v in query.items() if v}
        return self._call("GET", "/jobs", params=params)

    def get(self, job_id: str) -> dict[str, Any]:
        """The job with its state, progress, latest metrics and error."""
        return self._call("GET", f"/jobs/{job_id}")

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Ask for a job to stop (idempotent)."""
        return self._call("POST", f"/jobs/{job_id}/cancel")

    def metrics(self, job_id: str, *, after_step: int | None = None, limit: int | None = None) -> Any:
        """One page of the job's step history."""
        params = {k: v for k, v in {"after_step": after_step, "limit": limit}.items() if v is not None}
        return self._call("GET", f"/jobs/{job_id}/metrics", params=params)

    def all_metrics(self, job_id: str, page: int = 500) -> list[dict[str, Any]]:
        """The whole step history, paging with `after_step`."""
        rows: list[dict[str, Any]] = []
        after: int | None = None
        while True:
            body = self.metrics(job_id, after_step=after, limit=page)
            batch = body["data"] if isinstance(body, dict) else body
            rows.extend(batch)
            if len(batch) < page:
                return rows
            after = batch[-1]["step"]

    def logs(self, job_id: str, *, tail: int | None = None) -> str:
        """The training log (its last `tail` lines)."""
        body = self._call("GET", f"/jobs/{job_id}/logs", params={"tail": tail} if tail else {})
        if isinstance(body, dict):
            lines = body.get("lines")
            return "\n".join(lines) if isinstance(lines, list) else str(body.get("text", body))
        return body

    def artifacts(self, job_id: str) -> dict[str, Any]:
        """What can be downloaded: `{"model": [{name, size}], "checkpoints": [{name, step, size, files}]}`."""
        return self._call("GET", f"/jobs/{job_id}/artifacts")

    @contextmanager
    def download(self, job_id: str, name: str) -> Iterator[httpx.Response]:
        """The response of one artifact (a file, or a checkpoint directory as a tar), streamed: read it
        with `iter_bytes()`; TrainboxError when the server refuses."""
        with self.http.stream("GET", f"/jobs/{job_id}/artifacts/{name}") as response:
            if response.status_code >= 400:
                response.read()
                raise TrainboxError(response.status_code, _detail(response))
            yield response

    def gpus(self) -> Any:
        """The boxes and their GPUs, with the job holding each."""
        return self._call("GET", "/gpus")

    def queue(self) -> dict[str, Any]:
        """Every unfinished job, running first, then the queue in order."""
        return self._call("GET", "/queue")

    def me(self) -> dict[str, Any]:
        """Who the token belongs to, and the limits in force for them."""
        return self._call("GET", "/users/me")

    def upload_dataset(self, path: str | os.PathLike[str], *, text_field: str = "text", format: str = "auto") -> Any:
        """Upload a JSONL or text training file; name the returned id in a spec: `{"id": ...}`."""
        with open(path, "rb") as f:
            files = {"file": (os.path.basename(path), f, "application/octet-stream")}
            return self._call("POST", "/datasets", files=files, data={"text_field": text_field, "format": format})

    def datasets(self) -> dict[str, Any]:
        """Your uploaded datasets."""
        return self._call("GET", "/datasets")

    def delete_dataset(self, dataset_id: str) -> None:
        """Delete one of your uploads and its file (409 while an unfinished job trains on it)."""
        self._call("DELETE", f"/datasets/{dataset_id}")

    def prune(self, *, older_than_days: float | None = None, dry_run: bool = False) -> dict[str, Any]:
        """Admins: delete the checkpoints of jobs finished at least `older_than_days` ago (default: the
        server's retention setting); `dry_run` only reports. Returns the jobs and `bytes_freed`."""
        body: dict[str, Any] = {"dry_run": dry_run}
        if older_than_days is not None:
            body["older_than_days"] = older_than_days
        return self._call("POST", "/admin/prune", json=body)

    def _state_while_restarting(self, job_id: str) -> str:
        """The job's state; a 502/503/504 (a server stopping or starting) raises _Restarting."""
        try:
            return str(self.get(job_id)["state"])
        except TrainboxError as exc:
            if exc.status_code in RESTARTING_STATUSES:
                raise _Restarting(f"HTTP {exc.status_code}") from None
            raise

    def events(
        self,
        job_id: str,
        *,
        last_event_id: str | None = None,
        reconnect: bool = True,
        retry_s: float = 0.5,
        on_connection: Callable[[str | None], object] | None = None,
    ) -> Iterator[Event]:
        """The job's live events until it ends; on a lost connection it resumes with Last-Event-ID, which
        the server makes exact: no step lost or repeated, even where Redis lost events.

        Through a server restart (connection refused or lost, or a 502/503/504 on the way back) it keeps
        trying for RECONNECT_FOR_S, then raises; `on_connection` hears why while it does, and None once
        the stream is back."""
        down_since: float | None = None  # the server unreachable since: give up after RECONNECT_FOR_S
        final = False  # the job ended while its stream was cut: one more resume brings its tail and end
        while True:
            headers = {"Accept": "text/event-stream"}
            if last_event_id:
                headers["Last-Event-ID"] = last_event_id
            try:
                with self.http.stream(
                    "GET", f"/jobs/{job_id}/events", headers=headers, timeout=httpx.Timeout(30.0, read=STREAM_SILENCE_S)
                ) as response:
                    if response.status_code in RESTARTING_STATUSES:
                        response.read()
                        raise _Restarting(f"HTTP {response.status_code}")
                    if response.status_code >= 400:
                        response.read()
                        raise TrainboxError(response.status_code, _detail(response))
                    if down_since is not None and on_connection is not None:
                        on_connection(None)
                    down_since = None
                    for event_id, name, raw in parse_sse(response.iter_lines()):
                        if event_id:
                            last_event_id = event_id
                        try:
                            data = json.loads(raw)
                        except ValueError:
                            data = {"text": raw}
                        if not isinstance(data, dict):
                            data = {"value": data}
                        event = Event(event_id, str(data.get("type") or name or "message"), data)
                        yield event
                        if event.type in ("state", "end") and data.get("state") in TERMINAL_STATES:
                            return
                # The stream ended without the job's end: a server going down, or losing Redis, ends
                # its streams so. Resume; once more only if the job has ended meanwhile.
                if not reconnect or final:
                    return
                final = self._state_while_restarting(job_id) in TERMINAL_STATES
            except httpx.UnsupportedProtocol:
                raise  # a bad URL does not heal
            except (httpx.TransportError, _Restarting) as exc:
                down_since = down_since or time.monotonic()
                if not reconnect or time.monotonic() - down_since > RECONNECT_FOR_S:
                    if isinstance(exc, _Restarting):
                        raise TrainboxError(503, f"the server is not back after {RECONNECT_FOR_S:.0f}s") from None
                    raise
                if on_connection is not None:
                    on_connection(f"server unreachable ({str(exc).strip() or type(exc).__name__}); reconnecting")
            time.sleep(retry_s)


class _Restarting(Exception):
    """The events endpoint answered as a server does while it restarts."""


def _detail(response: httpx.Response) -> Any:
    try:
        return response.json().get("detail", response.text)
    except ValueError:
        return response.text
