"""`trainbox up` (the embedded stack) and `trainbox demo` (a tiny job, followed live)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import typer
from rich.markup import escape

from client import config
from client.cli_common import api_errors, console, err_console, options, target
from client.config import default_data_dir, normalize_url, stack_pointer
from client.follow import follow, summary
from client.sdk import Client
from client.stack import STACK_FILE, Stack, StackError

DEMO_DATASET = "demo/corpus.jsonl"


class _Terminated(Exception):
    pass


def _raise_terminated(*_: object) -> None:
    raise _Terminated


@contextlib.contextmanager
def running_stack(stack: Stack) -> Iterator[Stack]:
    """Start the stack (it records itself in the data dir), and stop everything on exit, Ctrl-C or SIGTERM."""
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    stack.on_event = lambda line: console.print(f"  {escape(line)}")
    try:
        stack.start(on_step=stack.on_event)
        # For its user's CLI, from any working directory (client.config's lookup order). Only here:
        # stacks that tests and benchmarks start are nobody's default.
        with contextlib.suppress(OSError):
            config.note_stack(stack.url, stack.data_dir, os.getpid())
        yield stack
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not interrupt the shutdown
        console.print("stopping: ", end="")
        with contextlib.suppress(OSError):
            config.forget_stack(stack.data_dir)
        stack.stop()
        console.print("all stopped")
        signal.signal(signal.SIGTERM, previous)


def up(
    data_dir: Path = typer.Option(
        None,
        "--data-dir",
        help="where the database, runs and data live",
        show_default="TRAINBOX_DATA_DIR, else ./.trainbox",
    ),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    slots: int = typer.Option(
        None, "--cpu-slots", help="CPU slots offered when the box has no GPU", show_default="TRAINBOX_CPU_SLOTS, else 2"
    ),
) -> None:
    """Run the whole service on this machine (SQLite, Redis, API, worker) until Ctrl-C."""
    extra = {"TRAINBOX_CPU_SLOTS": str(slots)} if slots else {}
    stack = Stack(data_dir=data_dir or default_data_dir(), host=host, port=port, extra_env=extra)
    console.print(f"[bold]trainbox[/] starting in {stack.data_dir.expanduser().resolve()}")
    try:
        with running_stack(stack):
            console.print(f"[green]ready[/]: dashboard at {stack.url}/  API at {stack.url}  (Ctrl-C stops everything)")
            console.print(
                f"  the CLI finds this stack from any directory (noted in {escape(str(stack_pointer()))}); "
                "`trainbox whoami` shows it"
            )
            stack.wait()
    except (KeyboardInterrupt, _Terminated):
        pass
    except StackError as exc:
        err_console.print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(1) from None


def write_demo_corpus(data_root: Path, records: int = 600, seed: int = 0) -> Path:
    """A small JSONL corpus with enough structure for the loss to fall in a few dozen steps."""
    path = data_root / DEMO_DATASET
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    subjects = ["the model", "a gpu", "the scheduler", "each rank", "the worker", "the queue", "a job"]
    verbs = ["trains", "waits for", "reads", "writes", "streams", "checkpoints", "schedules"]
    objects = ["the tokens", "a batch", "the loss", "its gradients", "the next step", "the events"]
    with path.open("w") as f:
        for _ in range(records):
            text = ". ".join(
                f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}" for _ in range(rng.randint(6, 12))
            )
            f.write(json.dumps({"text": text + "."}) + "\n")
    return path


def demo_spec(steps: int, dataset_id: str | None = None) -> dict[str, Any]:
    """A 2-GPU (CPU slot) job on the tiny preset (on an uploaded dataset, or the corpus in the data root)."""
    return {
        "name": "demo-tiny",
        "model": "preset:tiny",
        "dataset": {"id": dataset_id} if dataset_id else {"path": DEMO_DATASET, "text_field": "text"},
        "gpus": 2,
        "seq_len": 64,
        "max_steps": steps,
        "deepspeed": {
            "train_batch_size": 16,
            "gradient_accumulation_steps": 1,
            "optimizer": {"type": "AdamW", "params": {"lr": 2e-3, "weight_decay": 0.01}},
            "zero_optimization": {"stage": 1},
        },
        "checkpoint_every": max(1, steps // 2),
        "max_runtime_s": 1800,
    }


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def _run_demo(client: Client, data_dir: Path, steps: int) -> tuple[dict[str, Any], float | None]:
    corpus = write_demo_corpus(data_dir / "data")
    # Uploaded, so the demo works against any stack, not only one sharing this data dir.
    dataset = client.upload_dataset(corpus, text_field="text")
    job = client.submit(demo_spec(steps, dataset["id"]))
    console.print(f"submitted [bold]{job['id']}[/]: preset:tiny on 2 slots, {steps} steps")
    return follow(client, job["id"], console)


def demo(
    data_dir: Path = typer.Option(
        None, "--data-dir", help="the stack's data dir", show_default="TRAINBOX_DATA_DIR, else ./.trainbox"
    ),
    steps: int = typer.Option(120, "--steps", min=1),
    port: int = typer.Option(8000, "--port", help="port for the stack the demo starts if none is running"),
) -> None:
    """Train a tiny model on 2 slots and follow it live (starts the stack if none is running)."""
    data_dir = (data_dir or default_data_dir()).expanduser().resolve()
    record = data_dir / STACK_FILE
    found = target()
    recorded = normalize_url(json.loads(record.read_text())["url"]) if record.exists() else None
    url = options["url"] or recorded or (found.url if found.url_source != "the default" else None)
    if url and _healthy(url):
        console.print(f"using the running stack at {url}")
        token = found.token if normalize_url(url) == found.url else None
        token = token or (Stack(data_dir=data_dir).token() if normalize_url(url) == recorded else None)
        with api_errors():
            final, first_loss = _run_demo(Client(url, token), data_dir, steps)
    else:
        stack = Stack(data_dir=data_dir, port=port)
        console.print(f"[bold]trainbox demo[/]: starting the stack in {data_dir}")
        try:
            with running_stack(stack), api_errors():
                final, first_loss = _run_demo(Client(stack.url, options["token"] or stack.token()), data_dir, steps)
        except (KeyboardInterrupt, _Terminated):
            raise typer.Exit(130) from None
        except StackError as exc:
            err_console.print(f"[red]error:[/] {exc}")
            raise typer.Exit(1) from None
    console.print(summary(final, first_loss))
    if final["state"] != "succeeded":
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add `up` and `demo` to the CLI."""
    app.command()(up)
    app.command()(demo)
