"""The SDK's pieces that need no server: the SSE parser, error formatting, reading spec files."""

from __future__ import annotations

import json

import pytest
import typer

from client.cli_common import load_spec
from client.sdk import TrainboxError, format_detail, parse_sse


def test_parse_sse_follows_the_event_stream_rules():
    lines = [
        ": ping",
        "id: 1-0",
        "event: metric",
        'data: {"type": "step",',
        'data: "step": 1}',
        "",
        "retry: 1000",
        "",
        "id: 2-0",
        "data:plain",
        "",
        "data: no dispatch without a blank line",
    ]
    got = list(parse_sse(iter(lines)))
    assert got == [("1-0", "metric", '{"type": "step",\n"step": 1}'), ("2-0", None, "plain")]
    assert json.loads(got[0][2]) == {"type": "step", "step": 1}


def test_errors_read_as_one_line():
    detail = [{"loc": ["body", "deepspeed", "train_batch_size"], "msg": "impossible batch", "type": "value_error"}]
    assert format_detail(detail) == "deepspeed.train_batch_size: impossible batch"
    assert str(TrainboxError(422, detail)) == "HTTP 422: deepspeed.train_batch_size: impossible batch"
    assert format_detail("plain") == "plain"


def test_specs_load_from_yaml_or_json(tmp_path):
    (tmp_path / "a.yaml").write_text("name: a\ngpus: 2\ndeepspeed:\n  train_batch_size: 8\n")
    (tmp_path / "b.json").write_text(json.dumps({"name": "b"}))
    (tmp_path / "c.yaml").write_text("- not\n- a mapping\n")
    assert load_spec(tmp_path / "a.yaml") == {"name": "a", "gpus": 2, "deepspeed": {"train_batch_size": 8}}
    assert load_spec(tmp_path / "b.json") == {"name": "b"}
    with pytest.raises(typer.Exit):
        load_spec(tmp_path / "c.yaml")


def test_a_stream_gone_silent_is_reconnected_with_last_event_id(monkeypatch):
    """A server that vanished without closing the connection (no keep-alive for STREAM_SILENCE_S): the
    follower does not wait forever; it reconnects and resumes after the last event it saw."""
    import socket
    import threading

    from client import sdk

    monkeypatch.setattr(sdk, "STREAM_SILENCE_S", 0.5)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    requests: list[str] = []
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n"

    def serve() -> None:
        held = []
        for body in (b'id: 5-0:1\nevent: step\ndata: {"type": "step", "step": 1}\n\n', None):
            conn, _ = listener.accept()
            requests.append(conn.recv(65536).decode())
            if body is not None:
                conn.sendall(head + body)  # then silence: the connection stays open, nothing more comes
                held.append(conn)
            else:
                conn.sendall(head + b'id: 6-0:1\ndata: {"type": "state", "state": "succeeded"}\n\n')
                conn.close()
        for conn in held:
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with sdk.Client(f"http://127.0.0.1:{listener.getsockname()[1]}", "t") as client:
        seen = [(e.type, e.data.get("step"), e.data.get("state")) for e in client.events("j1", retry_s=0.05)]
    thread.join(5)
    listener.close()
    assert seen == [("step", 1, None), ("state", None, "succeeded")]
    assert "last-event-id: 5-0:1" in requests[1].lower()


def test_a_server_answering_503_while_it_stops_is_waited_for(monkeypatch):
    """The stream ends cleanly (a server stopping ends its streams), and the job's GET then gets a 503
    from the server on its way down: the follower waits for it instead of giving up."""
    import socket
    import threading

    from client import sdk

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    close = "connection: close\r\n"
    down = '{"detail": [{"loc": [], "msg": "shutting down", "type": "unavailable"}]}'
    answers = [
        f"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n{close}\r\n"
        'id: 5-0:1\ndata: {"type": "step", "step": 1}\n\n',
        f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        f"content-length: {len(down)}\r\n{close}\r\n{down}",
        f"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n{close}\r\n"
        'id: 6-0:1\ndata: {"type": "state", "state": "succeeded"}\n\n',
    ]
    requests: list[str] = []

    def serve() -> None:
        for answer in answers:
            conn, _ = listener.accept()
            requests.append(conn.recv(65536).decode())
            conn.sendall(answer.encode())
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with sdk.Client(f"http://127.0.0.1:{listener.getsockname()[1]}", "t") as client:
        seen = [e.type for e in client.events("j1", retry_s=0.05)]
    thread.join(5)
    listener.close()
    assert seen == ["step", "state"]
    assert [r.split(" ")[1] for r in requests] == ["/jobs/j1/events", "/jobs/j1", "/jobs/j1/events"]
