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
