"""Job commands: submit, validate, list, status, follow, logs, cancel, download, gpus.

Every string from the server goes through `text()` (or is printed with markup off): names, errors
and log lines are shown as they are, never read as rich markup.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from client.cli_common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    api_errors,
    console,
    duration,
    gpus_cell,
    load_spec,
    make_client,
    plain,
    text,
    when,
)
from client.cli_download import download
from client.follow import follow, summary
from client.sdk import TERMINAL_STATES


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
        if isinstance(job.get("start_eta_s"), int | float):
            where += f", starts in about {duration(job['start_eta_s'])}"
        console.print(f"submitted [bold]{text(job['id'])}[/] ({text(job.get('name'))}): {text(job['state'])}{where}")
        if follow_:
            _follow_to_end(job["id"])


def _number(value: object) -> str:
    """1234567 -> 1.2M; 624960 -> 625.0k."""
    if not isinstance(value, int | float):
        return "?"
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.1f}{suffix}"
    return str(value)


def _data_line(stats: dict[str, Any]) -> str:
    """One data file of the dry run: formats, records, tokens, what is trained on, overlong examples."""
    records = f"{'' if stats.get('records_counted', True) else '~'}{stats.get('records')} records"
    line = (
        f"{stats.get('file_format')} ({stats.get('data_format')}), {records}, "
        f"~{_number(stats.get('estimated_tokens'))} tokens"
    )
    share = stats.get("trained_share")
    if isinstance(share, int | float) and share < 1:
        line += f", {share:.0%} of them trained on"
    if stats.get("overlong"):
        line += f", {stats['overlong']} over seq_len ({stats.get('overlong_policy')})"
    return line


def validate(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, help="JobSpec as YAML or JSON"),
    show_config: bool = typer.Option(False, "--config", help="print the resolved DeepSpeed config too"),
    as_json: bool = typer.Option(False, "--json", help="the server's whole answer as JSON"),
) -> None:
    """Check a spec without submitting it: batch arithmetic, memory estimate, queue position."""
    spec = load_spec(file)
    with api_errors():
        result = make_client().validate(spec)
    if as_json:
        console.print_json(json.dumps(result))
        return
    memory = result.get("memory") or {}
    fits = memory.get("fits")
    verdict = {True: "[green]fits[/]", False: "[red]does not fit[/]", None: "[yellow]fit unknown[/]"}[fits]
    console.print(f"[bold]{text(file.name)}[/]: valid, {verdict}")
    rows = [
        (
            "batch",
            f"{result.get('train_batch_size')} = micro {result.get('micro_batch')} x accumulation "
            f"{result.get('grad_accum')} x {result.get('world_size')} GPUs",
        ),
        ("precision", str(result.get("precision"))),
        (
            "model",
            " ".join(str(v) for v in (result.get("model") or {}).values())
            + f" ({_number(result.get('n_params'))} parameters)",
        ),
    ]
    data = result.get("data") or {}
    for key in ("train", "validation"):
        if data.get(key):
            rows.append((f"{key} data", _data_line(data[key])))
    split = data.get("split") or {}
    if split:
        rows.append(
            (
                "held out",
                f"{split.get('fraction', 0):.0%}: {split.get('train_records')} records to train on, "
                f"{split.get('validation_records')} to evaluate",
            )
        )
    per_gpu, gpu = memory.get("per_gpu_gb"), memory.get("gpu_memory_gb")
    mem = f"~{per_gpu} GB per GPU" if per_gpu is not None else "unknown"
    if gpu:
        mem += f" of {gpu} GB"
    breakdown = memory.get("breakdown_gb") or {}
    if breakdown:
        mem += " (" + ", ".join(f"{k} {v}" for k, v in breakdown.items()) + ")"
    rows.append(("memory", mem))
    rows.append(("max runtime", f"{duration(result.get('max_runtime_s'))} ({result.get('max_runtime_s')} s)"))
    rows.append(("queue", f"it would be number {result.get('queue_position')} in the queue"))
    for key, value in rows:
        plain(f"  {key:<12} {value}")
    for note in [*(result.get("notes") or []), *(memory.get("notes") or [])]:
        plain(f"  note: {note}")
    if show_config:
        console.print("  DeepSpeed config (resolved):", markup=False)
        plain(json.dumps(result.get("deepspeed_config"), indent=2))


def list_jobs(
    state: str = typer.Option(None, "--state", help="only jobs in this state", show_default="all states"),
    owner: str = typer.Option(None, "--owner", help="only this user's jobs", show_default="yours; admins: everyone's"),
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
            text(gpus_cell(job)),
            text(_progress(job)),
            f"{loss:.4f}" if isinstance(loss, int | float) else "",
            text(when(job.get("created_at"))),
        )
    console.print(table)
    if page.get("next_cursor"):
        console.print(f"[dim]more: --cursor {text(page['next_cursor'])}[/]")


def _instant(value: object) -> datetime | None:
    """The API's ISO time as an aware datetime (UTC when it carries no zone); None if absent or unreadable."""
    try:
        moment = datetime.fromisoformat(str(value).replace("Z", "+00:00")) if value else None
    except ValueError:
        return None
    return moment.replace(tzinfo=UTC) if moment and moment.tzinfo is None else moment


def status(job_id: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """Show one job: state, queue position and start ETA, progress, latest metrics (eval loss too), error."""
    with api_errors():
        job = make_client().get(job_id)
    if as_json:
        console.print_json(json.dumps(job))
        return
    console.print(summary(job))
    progress = job.get("progress") or {}
    if job["state"] == "queued":
        eta = job.get("start_eta_s")
        plain(
            f"  queue position {job.get('queue_position') if job.get('queue_position') is not None else '-'}"
            + (f", starts in about {duration(eta)}" if isinstance(eta, int | float) else ", start time unknown")
        )
    elif job["state"] not in TERMINAL_STATES:
        eta = progress.get("eta_s")
        plain(
            f"  progress {_progress(job) or '-'}" + (f", ETA {duration(eta)}" if isinstance(eta, int | float) else "")
        )
    if job.get("gpu_ids"):
        box = f" on {job['box']}" if job.get("box") else ""
        plain(f"  gpus {gpus_cell(job)}{box}, attempt {job.get('attempt')}")
    else:
        plain(f"  gpus {gpus_cell(job)}")
    times = [f"submitted {when(job.get('created_at'))}"]
    started, finished = _instant(job.get("started_at")), _instant(job.get("finished_at"))
    if job.get("started_at"):
        times.append(f"started {when(job['started_at'])}")
    if job.get("finished_at"):
        times.append(f"finished {when(job['finished_at'])}")
    if started and finished:
        times.append(f"ran {duration((finished - started).total_seconds())}")
    elif started and job["state"] not in TERMINAL_STATES:
        times.append(f"running for {duration((datetime.now(UTC) - started).total_seconds())}")
    plain("  " + ", ".join(times) + " (UTC)")
    if job.get("disk_bytes") is not None:
        console.print(f"  disk {job['disk_bytes']} bytes (run directory)", markup=False)
    error = job.get("error") or {}
    if error.get("log_tail"):
        console.print("  [dim]log tail:[/]")
        plain(error["log_tail"])


def _follow_to_end(job_id: str, show_logs: bool = False) -> None:
    try:
        job, first_loss = follow(make_client(), job_id, console, show_logs=show_logs)
    except KeyboardInterrupt:
        console.print(f"stopped following; the job goes on (`trainbox follow {job_id}` comes back)", markup=False)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    console.print(summary(job, first_loss))
    if job["state"] != "succeeded":
        raise typer.Exit(EXIT_FAILED)


def follow_cmd(job_id: str, logs: bool = typer.Option(False, "--logs", help="print log lines too")) -> None:
    """Follow a job live: progress, loss, tokens/s and ETA until it ends."""
    with api_errors():
        _follow_to_end(job_id, show_logs=logs)


def logs(job_id: str, tail: int = typer.Option(None, "--tail", "-n", help="only the last N lines")) -> None:
    """Print a job's training log."""
    with api_errors():
        text = make_client().logs(job_id, tail=tail)
    plain(text, end="" if text.endswith("\n") else "\n")


def cancel(job_id: str) -> None:
    """Cancel a job (queued: at once; running: after it stops)."""
    with api_errors():
        job = make_client().cancel(job_id)
    plain(f"job {job_id}: {job.get('state', 'cancel requested')}")


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
    app.command()(validate)
    app.command("list")(list_jobs)
    app.command()(status)
    app.command("follow")(follow_cmd)
    app.command()(logs)
    app.command()(cancel)
    app.command()(download)
    app.command()(gpus)
