"""Job commands: submit, list, status, follow, logs, cancel, gpus.

Every string from the server goes through `text()` (or is printed with markup off): names, errors
and log lines are shown as they are, never read as rich markup.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from client.cli_common import api_errors, console, load_spec, make_client, text
from client.follow import follow, summary
from client.sdk import TERMINAL_STATES


def _age(job: dict[str, Any]) -> str:
    return str(job.get("created_at") or "")[:19].replace("T", " ")


def _progress(job: dict[str, Any]) -> str:
    progress = job.get("progress") or {}
    step, total = progress.get("step"), progress.get("total_steps")
    if step is None:
        return ""
    return f"{step}/{total}" if total else str(step)


def submit(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, help="JobSpec as YAML or JSON"),
    follow_: bool = typer.Option(False, "--follow", "-f", help="follow the job until it ends"),
    idempotency_key: str = typer.Option(None, "--idempotency-key", help="same key + same spec -> same job"),
) -> None:
    """Submit a training job."""
    spec = load_spec(file)
    with api_errors():
        client = make_client()
        job = client.submit(spec, idempotency_key=idempotency_key)
        position = job.get("queue_position")
        where = f", queue position {position}" if position is not None else ""
        console.print(f"submitted [bold]{text(job['id'])}[/] ({text(job.get('name'))}): {text(job['state'])}{where}")
        if follow_:
            _follow_to_end(job["id"])


def list_jobs(
    state: str = typer.Option(None, "--state", help="only jobs in this state"),
    owner: str = typer.Option(None, "--owner", help="only this user's jobs"),
    limit: int = typer.Option(20, "--limit", "-n", min=1),
    cursor: str = typer.Option(None, "--cursor", help="the next page: the cursor the previous page printed"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List jobs, newest first (a page at a time: --limit, then --cursor)."""
    with api_errors():
        page = make_client().list(state=state, owner=owner, limit=limit, cursor=cursor)
    if as_json:
        console.print_json(json.dumps(page))
        return
    table = Table("id", "name", "owner", "state", "gpus", "progress", "loss", "created")
    for job in page["data"]:
        loss = (job.get("latest") or {}).get("loss")
        table.add_row(
            text(job["id"]),
            text(job.get("name")),
            text(job.get("owner")),
            text(job["state"]),
            text(",".join(str(g) for g in job.get("gpu_ids") or []) or str(job.get("gpus") or "")),
            text(_progress(job)),
            f"{loss:.4f}" if isinstance(loss, int | float) else "",
            text(_age(job)),
        )
    console.print(table)
    if page.get("next_cursor"):
        console.print(f"[dim]more: --cursor {text(page['next_cursor'])}[/]")


def status(job_id: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """Show one job: state, progress, latest metrics, error."""
    with api_errors():
        job = make_client().get(job_id)
    if as_json:
        console.print_json(json.dumps(job))
        return
    console.print(summary(job))
    progress = job.get("progress") or {}
    if job["state"] not in TERMINAL_STATES:
        eta = progress.get("eta_s")
        console.print(
            f"  progress {_progress(job) or '-'}"
            + (f", ETA {eta:.0f}s" if isinstance(eta, int | float) else "")
            + (f", queue position {job['queue_position']}" if job.get("queue_position") is not None else ""),
            markup=False,
        )
    if job.get("gpu_ids"):
        console.print(f"  gpus {job['gpu_ids']}, attempt {job.get('attempt')}", markup=False)
    if job.get("disk_bytes") is not None:
        console.print(f"  disk {job['disk_bytes']} bytes (run directory)", markup=False)
    error = job.get("error") or {}
    if error.get("log_tail"):
        console.print("  [dim]log tail:[/]")
        console.print(error["log_tail"], markup=False, highlight=False)


def _follow_to_end(job_id: str, show_logs: bool = False) -> None:
    job, first_loss = follow(make_client(), job_id, console, show_logs=show_logs)
    console.print(summary(job, first_loss))
    if job["state"] != "succeeded":
        raise typer.Exit(1)


def follow_cmd(job_id: str, logs: bool = typer.Option(False, "--logs", help="print log lines too")) -> None:
    """Follow a job live: progress, loss, tokens/s and ETA until it ends."""
    with api_errors():
        _follow_to_end(job_id, show_logs=logs)


def logs(job_id: str, tail: int = typer.Option(None, "--tail", "-n", help="only the last N lines")) -> None:
    """Print a job's training log."""
    with api_errors():
        text = make_client().logs(job_id, tail=tail)
    console.print(text, markup=False, highlight=False, end="" if text.endswith("\n") else "\n")


def cancel(job_id: str) -> None:
    """Cancel a job (queued: at once; running: after it stops)."""
    with api_errors():
        job = make_client().cancel(job_id)
    console.print(f"job {job_id}: {job.get('state', 'cancel requested')}", markup=False, highlight=False)


def gpus(as_json: bool = typer.Option(False, "--json")) -> None:
    """Show the boxes, their GPUs and which job holds each."""
    with api_errors():
        body = make_client().gpus()
    if as_json:
        console.print_json(json.dumps(body))
        return
    table = Table("box", "gpu", "name", "memory", "job", "owner", "job state")
    for box in body.get("data", []):
        for gpu in box.get("gpus", []):
            mem, job = gpu.get("memory_mb"), gpu.get("job") or {}
            table.add_row(
                text(box.get("name")),
                text(gpu.get("index")),
                text(gpu.get("name")),
                f"{mem / 1024:.0f} GiB" if isinstance(mem, int | float) and mem else "",
                text(job.get("id") or job.get("name") or "free"),  # others' jobs show by name only
                text(job.get("owner")),
                text(job.get("state")),
            )
    console.print(table)
    if "total" in body:
        console.print(f"{body.get('in_use', 0)} of {body['total']} in use", markup=False)


def register(app: typer.Typer) -> None:
    """Add the job commands to the CLI."""
    app.command()(submit)
    app.command("list")(list_jobs)
    app.command()(status)
    app.command("follow")(follow_cmd)
    app.command()(logs)
    app.command()(cancel)
    app.command()(gpus)
