"""The loop's rules that a short CPU run cannot provoke: divergence, and events that stay valid JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from trainer.events import EventWriter, read_events
from trainer.loop import Diverged, Loop


def loop(precision: str) -> Loop:
    return Loop(
        spec=None,
        run_dir=Path("."),
        engine=None,
        batches=None,
        device=None,
        events=None,  # type: ignore[arg-type]
        stop=None,
        total_steps=10,
        flops_per_token=None,
        peak_flops=None,
        precision=precision,
    )  # type: ignore[arg-type]


def test_nan_loss_fails_at_once_in_bf16_and_fp32() -> None:
    lp = loop("bf16")
    lp.step = 7
    with pytest.raises(Diverged, match="loss became nan at step 7"):
        lp._check_finite(math.nan)


def test_fp16_tolerates_a_transient_overflow_but_not_a_persistent_one() -> None:
    lp = loop("fp16")
    lp._check_finite(math.inf)
    lp._check_finite(1.0)  # recovered: the loss scaler did its job
    lp._check_finite(math.inf)
    lp._check_finite(math.nan)
    with pytest.raises(Diverged, match="3 steps in a row"):
        lp._check_finite(math.nan)


def test_non_finite_values_are_written_as_null(tmp_path: Path) -> None:
    w = EventWriter(tmp_path)
    w.emit("step", step=1, loss=math.nan, extra={"x": math.inf})
    w.close()
    line = (tmp_path / "events.jsonl").read_text()
    assert "NaN" not in line and "Infinity" not in line
    (event,) = read_events(tmp_path)
    assert event["loss"] is None and event["extra"] == {"x": None}
    json.loads(line)


def test_a_torn_last_line_is_left_for_later(tmp_path: Path) -> None:
    (tmp_path / "events.jsonl").write_text('{"type": "step", "step": 1}\n{"type": "st')
    assert [e["step"] for e in read_events(tmp_path)] == [1]


def test_launcher_blames_the_cause_not_the_peer_whose_connection_broke(tmp_path: Path) -> None:
    from argparse import Namespace

    from trainer.events import write_rank_error
    from trainer.launch import Launcher

    launcher = Launcher(Namespace(run_dir=str(tmp_path)))
    write_rank_error(tmp_path, 0, "train_error", "RuntimeError: gloo Read error: Connection reset by peer")
    write_rank_error(tmp_path, 1, "oom", "out of host memory: could not allocate 64.0 MiB")
    # Rank 0 was seen first, but it only lost its peer; rank 1 ran out of memory.
    assert launcher._cause([(0, 1), (1, 1)], killed_by_us=set()) == (1, 1)
    # A rank killed from outside beats both; one the launcher killed itself after the grace does not.
    assert launcher._cause([(0, 1), (1, 1), (2, -9)], killed_by_us=set()) == (2, -9)
    assert launcher._cause([(0, 1), (2, -9)], killed_by_us={2}) == (0, 1)
    assert launcher._cause([], killed_by_us=set()) is None
