"""`trainbox users` and `trainbox tokens` moved to the server: they act on the database, and the
client needs no server code. These stubs say where they went."""

from __future__ import annotations

import typer

from client.cli_common import print_error

MOVED = "{group} commands act on the database: run them on the server as `trainbox-admin {group} ...`"


def register(app: typer.Typer) -> None:
    """Add `users` and `tokens`, which point at `trainbox-admin`."""
    for group in ("users", "tokens"):

        def moved(ctx: typer.Context, group: str = group) -> None:
            print_error(MOVED.format(group=group))
            raise typer.Exit(2)

        app.command(
            group,
            help=f"Moved: `trainbox-admin {group}` (on the server).",
            context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
        )(moved)
