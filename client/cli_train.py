"""`trainbox train` and `trainbox bench`: the trainer on this machine, without the service.

For trying a spec before queueing it, and for measuring a box; the service runs the very same
program (`python -m trainer run`) for every job.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from client.cli_common import load_spec
from client.follow import FollowView

console = Console()


def train(
    spec_file: Path = typer.Argument(..., help="JobSpec as YAML or JSON"),
    run_dir: Path = typer.Option(None, "--run-dir", help="outputs go here", show_default="runs/<name>"),
    data_root: Path = typer.Option(Path("."), "--data-root", help="dataset paths are relative to this"),
    model_root: Path = typer.Option(Path("."), "--model-root", help="model directories are relative to this"),
) -> None:
    """Train a spec here with a live loss display; Ctrl-C checkpoints, and running again resumes."""
    # The trainer is imported here, not at module level: the rest of the CLI needs no trainer code.
    from trainer.events import EVENTS_FILE, EXIT_PREEMPTED, LOG_FILE, SPEC_FILE, read_events, trainer_argv
    from trainer.spec import JobSpec, describe_errors

    try:
        spec = JobSpec.model_validate(load_spec(spec_file))
    except ValidationError as e:
        console.print(f"[red]invalid spec:[/] {escape(describe_errors(e))}")
        raise typer.Exit(2) from None
    run_dir = run_dir or Path("runs") / spec.name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / SPEC_FILE).write_text(spec.model_dump_json())
    offset = (run_dir / EVENTS_FILE).stat().st_size if (run_dir / EVENTS_FILE).exists() else 0
    cmd = trainer_argv(run_dir, model_root=model_root, data_root=data_root)
    proc = subprocess.Popen(cmd)
    end = None
    with FollowView(console, {"id": spec.name, "name": spec.name, "state": "running"}) as view:
        while True:
            done = proc.poll() is not None
            events = read_events(run_dir, offset)
            if events:
                offset = (run_dir / EVENTS_FILE).stat().st_size
            for event in events:
                view.handle(event["type"], event)
                end = event if event["type"] == "end" else end
            if done:
                break
            try:
                time.sleep(0.2)
            except KeyboardInterrupt:  # the ranks got SIGINT too: they checkpoint and stop
                console.print("[yellow]stopping: checkpointing first (Ctrl-C again does not hurry it)[/]")
    code = proc.wait()
    status = (end or {}).get("status", "failed")
    colour = {"succeeded": "green", "preempted": "yellow"}.get(status, "red")
    console.print(
        f"[bold {colour}]{escape(str(status))}[/] " + escape(f"(run dir {run_dir}, log {run_dir / LOG_FILE})")
    )
    if end and end.get("error"):
        console.print(f"[red]{escape(str(end['error']['type']))}[/]: {escape(str(end['error']['message']))}")
    if code == EXIT_PREEMPTED:
        console.print(f"resume with: trainbox train {spec_file} --run-dir {run_dir}", markup=False)
    raise typer.Exit(code)


def bench(
    model: str = typer.Option("preset:deepseek-1.3b", "--model"),
    batch_sizes: str = typer.Option("16,32,64", "--batch-sizes"),
    seq_len: int = typer.Option(2048, "--seq-len"),
    gpus: int = typer.Option(0, "--gpus", help="default: every visible GPU (2 CPU ranks without GPUs)"),
    precision: str = typer.Option("bf16", "--precision"),
    zero: int = typer.Option(2, "--zero"),
    steps: int = typer.Option(10, "--steps"),
    warmup: int = typer.Option(3, "--warmup"),
    max_micro: int = typer.Option(8, "--max-micro"),
    out_json: Path = typer.Option(None, "--json"),
) -> None:
    """Measure samples/s, tokens/s, peak memory and MFU over batch sizes (warm-up excluded)."""
    flags = {
        "--model": model,
        "--batch-sizes": batch_sizes,
        "--seq-len": seq_len,
        "--gpus": gpus,
        "--precision": precision,
        "--zero": zero,
        "--steps": steps,
        "--warmup": warmup,
        "--max-micro": max_micro,
        "--json": out_json or None,
    }
    argv = ["bench", *(str(arg) for flag, value in flags.items() if value is not None for arg in (flag, value))]
    from trainer.__main__ import main

    raise typer.Exit(main(argv))


def register(app: typer.Typer) -> None:
    """Add `train` and `bench` to the CLI."""
    app.command()(train)
    app.command()(bench)
