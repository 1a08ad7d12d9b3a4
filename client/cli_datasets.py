"""Commands for the caller's own things: `datasets upload/list/delete`, `queue`, `whoami`."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from client.cli_common import api_errors, console, duration, gpus_cell, make_client, plain, target, text, when

datasets_app = typer.Typer(help="Upload training files, list and delete yours.", no_args_is_help=True)


@datasets_app.command("upload")
def upload(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, help="JSONL (with the text field) or UTF-8 text"),
    text_field: str = typer.Option("text", "--text-field", help="the JSONL field that holds the text"),
) -> None:
    """Upload a dataset; prints the id to name in a spec: dataset: {id: <id>}."""
    with api_errors():
        ds = make_client().upload_dataset(file, text_field=text_field)
    console.print(
        f"uploaded [bold]{text(ds['id'])}[/] ({text(ds['format'])}, {ds['records']} records, "
        f"{ds['bytes']} bytes); in a spec: dataset: {{id: {text(ds['id'])}}}"
    )


@datasets_app.command("list")
def list_datasets(as_json: bool = typer.Option(False, "--json")) -> None:
    """Your uploaded datasets, newest first."""
    with api_errors():
        body = make_client().datasets()
    if as_json:
        console.print_json(json.dumps(body))
        return
    table = Table("id", "file", "format", "records", "bytes", "uploaded")
    for d in body["data"]:
        table.add_row(
            text(d["id"]),
            text(d["filename"]),
            text(d["format"]),
            text(d["records"]),
            text(d["bytes"]),
            text(when(d["created_at"])),
        )
    console.print(table)


@datasets_app.command("delete")
def delete_dataset(dataset_id: str = typer.Argument(..., help="the id `datasets list` shows")) -> None:
    """Delete one of your uploads (refused while an unfinished job trains on it)."""
    with api_errors():
        make_client().delete_dataset(dataset_id)
    console.print(f"deleted {text(dataset_id)}")


def queue(as_json: bool = typer.Option(False, "--json")) -> None:
    """Every unfinished job of every user: what runs, and what waits in which order."""
    with api_errors():
        body = make_client().queue()
    if as_json:
        console.print_json(json.dumps(body))
        return
    table = Table("#", "name", "owner", "state", "gpus", "prio", "starts in", "id")
    for j in body["data"]:
        eta = j.get("start_eta_s")
        table.add_row(
            text(j["queue_position"] or ""),
            text(j["name"]),
            text(j["owner"]),
            text(j["state"]),
            text(gpus_cell(j)),
            text(j["priority"]),
            f"~{duration(eta)}" if isinstance(eta, int | float) else ("?" if j["state"] == "queued" else ""),
            text(j.get("id") or ""),
        )
    console.print(table)


def whoami() -> None:
    """The server and token in use (and where each was found), their user, and the limits in force."""
    found = target()
    console.print(f"server {text(found.url)} (from {text(found.url_source)}), token from {text(found.token_source)}")
    with api_errors():
        me = make_client().me()
    console.print(f"[bold]{text(me['name'])}[/]{' (admin)' if me['is_admin'] else ''}")
    for key, value in me["limits"].items():
        plain(f"  {key:<24} {'no cap' if value is None else value}")
    disk = me.get("disk")
    if disk:
        plain(
            f"  {'disk in use':<24} {disk['total_bytes']} bytes ({disk['jobs_bytes']} in run directories, "
            f"{disk['uploads_bytes']} in uploads)"
        )


def register(app: typer.Typer) -> None:
    """Add `datasets` (upload, list, delete), `queue` and `whoami` to the CLI."""
    app.add_typer(datasets_app, name="datasets")
    app.command()(queue)
    app.command()(whoami)
