"""The follow view and the summary on their own (no server): eval lines, the queue wait, eval loss."""

from __future__ import annotations

import io

from rich.console import Console

from client.follow import FollowView, eval_text, summary


def _console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=160, force_terminal=False, color_system=None), out


def test_a_queued_job_shows_its_place_and_start_eta_then_eval_lines():
    console, out = _console()
    job = {"id": "j1", "name": "tiny", "state": "queued", "queue_position": 2, "start_eta_s": 725.0}
    with FollowView(console, job) as view:
        view.handle("state", {"type": "state", "state": "running"})
        view.handle("step", {"type": "step", "step": 1, "loss": 3.0, "tokens_per_s": 1500.0})
        view.handle("eval", {"type": "eval", "step": 1, "eval_loss": 2.31})  # perplexity left out: exp(2.31)
        view.handle("eval", {"type": "eval", "step": 2, "eval_loss": None})  # nothing to say
    shown = out.getvalue()
    assert "step 1: eval loss 2.3100 (ppl 10.07)" in shown and "step 2:" not in shown
    assert view.last_eval == {"type": "eval", "step": 2, "eval_loss": None}

    console, out = _console()
    with FollowView(console, job):
        pass
    assert "queued #2, starts in ~12m 5s" in out.getvalue()


def test_summary_shows_the_eval_loss_when_the_server_sends_it():
    job = {"id": "j1", "state": "succeeded", "latest": {"step": 9, "loss": 1.5, "eval_loss": 1.75, "perplexity": 5.75}}
    assert "eval loss 1.7500 (ppl 5.75)" in summary(job, 3.0)
    assert "eval" not in summary({"id": "j1", "state": "succeeded", "latest": {"step": 9, "loss": 1.5}})
    assert eval_text(1000.0) == "eval loss 1000.0000 (ppl inf)"
