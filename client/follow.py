"""Follow a job live: a rich progress bar with loss, throughput and ETA, fed by the SSE stream.

Names, states, errors, paths and log lines come from the server: they are escaped (or printed with
markup off), so a `[/]` in them is shown, not read as rich markup.
"""

from __future__ import annotations

import math
import time
from typing import Any

import httpx
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from client.cli_common import duration
from client.sdk import RECONNECT_FOR_S, RESTARTING_STATUSES, TERMINAL_STATES, Client, TrainboxError


def eval_text(eval_loss: Any, perplexity: Any = None) -> str:
    """`eval loss 2.3100 (ppl 10.07)`; the perplexity is exp(eval loss) when not given."""
    if not isinstance(eval_loss, int | float):
        return ""
    if not isinstance(perplexity, int | float):
        perplexity = math.exp(eval_loss) if eval_loss < 700 else math.inf
    return f"eval loss {eval_loss:.4f} (ppl {perplexity:.2f})"


def _fmt_rate(value: Any) -> str:
    if not isinstance(value, int | float):
        return "-"
    return f"{value / 1000:.1f}k" if value >= 1000 else f"{value:.0f}"


class FollowView:
    """Turns a job's events into a progress bar; remembers the last step and the final state."""

    def __init__(self, console: Console, job: dict[str, Any], show_logs: bool = False) -> None:
        self.console = console
        self.show_logs = show_logs
        self.state = str(job.get("state", "?"))
        waiting = ""  # queued: its place, and when it should start
        if self.state == "queued" and job.get("queue_position") is not None:
            eta = duration(job.get("start_eta_s"))
            waiting = f" #{job['queue_position']}" + (f", starts in ~{eta}" if eta else "")
        self.last_step: dict[str, Any] | None = None
        self.first_loss: float | None = None
        self.end: dict[str, Any] | None = None
        self.last_eval: dict[str, Any] | None = None
        self.down: str | None = None  # why the server is unreachable, while it is
        total = (job.get("progress") or {}).get("total_steps")
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss [cyan]{task.fields[loss]}"),
            TextColumn("[green]{task.fields[tps]}[/] tok/s"),
            TextColumn("{task.fields[state]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.task: TaskID = self.progress.add_task(
            escape(str(job.get("name") or job["id"])),
            total=total,
            loss="-",
            tps="-",
            state=escape(self.state + waiting),
        )

    def __enter__(self) -> FollowView:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def connection(self, problem: str | None) -> None:
        """The stream is down (`problem` says why) or back (None): said once each way, and in the bar."""
        if problem and not self.down:
            self.progress.console.print(f"[yellow]{escape(problem)} (for up to {RECONNECT_FOR_S:.0f}s)[/]")
            self.progress.update(self.task, state="[yellow]reconnecting[/]")
        elif problem is None and self.down:
            self.progress.console.print("[green]reconnected[/]")
            self.progress.update(self.task, state=escape(self.state))
        self.down = problem

    def handle(self, event_type: str, data: dict[str, Any]) -> None:
        """Update the view with one event."""
        if event_type == "start" and data.get("total_steps"):
            resumed = data.get("resumed_from_step") or 0
            self.progress.update(self.task, total=data["total_steps"], completed=resumed)
        elif event_type == "step":
            self.last_step = data
            loss = data.get("loss")
            if self.first_loss is None and isinstance(loss, int | float):
                self.first_loss = float(loss)
            self.progress.update(
                self.task,
                completed=data.get("step", 0),
                loss=f"{loss:.4f}" if isinstance(loss, int | float) else "-",
                tps=_fmt_rate(data.get("tokens_per_s")),
            )
        elif event_type == "state":
            self.state = str(data.get("state", self.state))
            self.progress.update(self.task, state=escape(self.state))
        elif event_type == "end":
            self.end = data
        elif event_type == "eval":
            self.last_eval = data
            line = eval_text(data.get("eval_loss"), data.get("perplexity"))
            if line:
                self.progress.console.print(escape(f"step {data.get('step')}: {line}"), highlight=False)
        elif event_type == "checkpoint":
            where = escape(f"{data.get('step')}: {data.get('path')}")
            self.progress.console.print(f"[dim]checkpoint at step {where}[/]")
        elif event_type == "log" and self.show_logs:
            for line in data.get("lines", []):
                self.progress.console.print(str(line), markup=False, highlight=False)


def _get_through_restart(client: Client, job_id: str) -> dict[str, Any]:
    """GET the job, waiting through a server restart as the event stream does."""
    deadline = time.monotonic() + RECONNECT_FOR_S
    while True:
        try:
            return client.get(job_id)
        except (httpx.TransportError, TrainboxError) as exc:
            restarting = not isinstance(exc, TrainboxError) or exc.status_code in RESTARTING_STATUSES
            if not restarting or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def follow(
    client: Client, job_id: str, console: Console, *, show_logs: bool = False
) -> tuple[dict[str, Any], float | None]:
    """Show a job's progress until it ends (through server restarts); return the final job and the
    first loss seen."""
    job = client.get(job_id)
    if job["state"] in TERMINAL_STATES:
        return job, None
    with FollowView(console, job, show_logs) as view:
        for event in client.events(job_id, on_connection=view.connection):
            view.handle(event.type, event.data)
    return _get_through_restart(client, job_id), view.first_loss


def summary(job: dict[str, Any], first_loss: float | None = None) -> str:
    """A few lines of rich markup saying how a job ended (with the loss it started from, when known);
    the server's text in it is escaped."""
    state = str(job["state"])
    colour = {"succeeded": "green", "failed": "red", "cancelled": "yellow"}.get(state, "white")
    lines = [f"job {escape(str(job['id']))} [bold {colour}]{escape(state)}[/]"]
    latest = job.get("latest") or {}
    if latest:
        parts = [escape(f"step {latest.get('step')}")]
        if isinstance(latest.get("loss"), int | float):
            start = f"{first_loss:.4f} -> " if first_loss is not None else ""
            parts.append(f"loss {start}{latest['loss']:.4f}")
        if isinstance(latest.get("tokens_per_s"), int | float):
            parts.append(f"{latest['tokens_per_s']:.0f} tokens/s")
        if isinstance(latest.get("samples_per_s"), int | float):
            parts.append(f"{latest['samples_per_s']:.1f} samples/s")
        if isinstance(latest.get("eval_loss"), int | float):
            parts.append(eval_text(latest["eval_loss"], latest.get("perplexity")))
        lines.append("  " + ", ".join(parts))
    error = job.get("error")
    if error:
        lines.append(f"  error [red]{escape(str(error.get('type')))}[/]: {escape(str(error.get('message')))}")
    artifacts = job.get("artifacts") or {}
    if artifacts.get("href") and job.get("state") == "succeeded":
        lines.append(f"  artifacts: {escape('GET ' + str(artifacts['href']))}")
    return "\n".join(lines)
