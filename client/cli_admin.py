"""Admin commands through the API: `trainbox prune` deletes finished jobs' checkpoints."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from client.cli_common import api_errors, console, make_client, plain, text, when


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def prune(
    older_than_days: float = typer.Option(
        None,
        "--older-than-days",
        min=0,
        help="jobs finished at least N days ago (0: all finished jobs)",
        show_default="the server's TRAINBOX_CHECKPOINT_RETENTION_DAYS",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="show what would be deleted, delete nothing"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Delete the checkpoints of finished jobs (admins); their final models and logs stay."""
    with api_errors():
        result = make_client().prune(older_than_days=older_than_days, dry_run=dry_run)
    if as_json:
        console.print_json(json.dumps(result))
        return
    table = Table("job", "owner", "finished", "checkpoints", "bytes")
    for j in result["jobs"]:
        table.add_row(
            text(j["id"]),
            text(j["owner"]),
            text(when(j["finished_at"])),
            text(", ".join(c.removeprefix("checkpoints/") for c in j["checkpoints"]) or "-"),
            text(human_bytes(j["bytes"])),
        )
    if result["jobs"]:
        console.print(table)
    verb = "would free" if result["dry_run"] else "freed"
    plain(
        f"{len(result['jobs'])} finished jobs (at least {result['older_than_days']:g} days ago): "
        f"{verb} {human_bytes(result['bytes_freed'])} ({result['bytes_freed']} bytes)"
        + (" (dry run: nothing deleted)" if result["dry_run"] else "")
    )


def register(app: typer.Typer) -> None:
    """Add `prune` to the CLI."""
    app.command()(prune)
