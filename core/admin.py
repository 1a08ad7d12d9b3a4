"""Admin commands on the server: `trainbox-admin users add/list/set` and `trainbox-admin tokens
create/list/revoke` (also `python -m core.admin`).

They act on the database directly (TRAINBOX_DATABASE_URL, or the SQLite file under TRAINBOX_DATA_DIR),
not through the API: they are how the first admin and their token are made. The `trainbox` client
needs no server code; these do, so they live here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from core.db import alembic_config, get_engine, session_scope, upgrade
from core.settings import SettingsError, get_settings
from core.users import (
    LIMIT_FIELDS,
    UserError,
    create_token,
    create_user,
    list_tokens,
    list_users,
    revoke_token,
    set_limits,
    token_status,
)

console = Console()
err_console = Console(stderr=True)


def print_error(message: object) -> None:
    """`error: <message>` on stderr, the message printed literally."""
    err_console.print(f"[red]error:[/] {escape(str(message))}")


users_app = typer.Typer(
    help="Manage users and their limits (on the server; acts on the database).", no_args_is_help=True
)
tokens_app = typer.Typer(
    help="Create, list and revoke API tokens (on the server; acts on the database).", no_args_is_help=True
)


@contextmanager
def database() -> Iterator[Any]:
    """A session on the configured database; the embedded SQLite one is migrated first if needed."""
    try:
        settings = get_settings()
    except SettingsError as exc:
        print_error(exc)
        raise typer.Exit(2) from None
    if settings.is_sqlite:
        upgrade(settings.database_url)  # the embedded default: nothing else would create the schema
    else:
        _require_head(get_engine())
    try:
        with session_scope() as session:
            yield session
    except UserError as exc:
        print_error(exc)
        raise typer.Exit(1) from None


def _require_head(engine: Any) -> None:
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory

    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    head = ScriptDirectory.from_config(alembic_config(str(engine.url))).get_current_head()
    if current != head:
        print_error(f"the database is at revision {current}, not {head}: run `python -m migrations upgrade` first")
        raise typer.Exit(1)


def _limit(value: int | None) -> str:
    return "-" if value is None else str(value)


@users_app.command("add")
def users_add(
    name: str = typer.Argument(..., help="the user name jobs will show as owner"),
    admin: bool = typer.Option(False, "--admin", help="may see and cancel every job and set limits"),
) -> None:
    """Add a user (then: trainbox-admin tokens create NAME)."""
    with database() as session:
        user = create_user(session, name=name, is_admin=admin)
        console.print(
            f"added {'admin' if user.is_admin else 'user'} [bold]{escape(user.name)}[/]; "
            f"give them a token: trainbox-admin tokens create {escape(user.name)}"
        )


@users_app.command("list")
def users_list() -> None:
    """Users, whether admin, and their limit overrides (- : the server's setting)."""
    with database() as session:
        table = Table(
            "name",
            "admin",
            "max gpus",
            "max queued",
            "max runtime s",
            "max priority",
            "submits/min",
            "datasets",
            "dataset bytes",
            "tokens",
            "disk bytes",
        )
        for u in list_users(session):
            limits = (_limit(getattr(u, f)) for f in LIMIT_FIELDS)
            table.add_row(escape(u.name), "yes" if u.is_admin else "", *limits)
        console.print(table)


@users_app.command("set")
def users_set(
    name: str,
    max_gpus: int = typer.Option(None, "--max-gpus", help="GPUs their jobs may hold at once"),
    max_queued: int = typer.Option(None, "--max-queued", help="jobs they may have waiting"),
    max_runtime_s: int = typer.Option(None, "--max-runtime-s", help="cap on a job's max_runtime_s"),
    max_priority: int = typer.Option(None, "--max-priority", help="highest priority (non-admins)"),
    submit_rate: int = typer.Option(None, "--submit-rate-per-minute", help="POST /jobs per minute"),
    max_datasets: int = typer.Option(None, "--max-datasets", help="uploaded datasets they may keep"),
    max_dataset_bytes: int = typer.Option(None, "--max-dataset-bytes", help="total bytes of their uploads"),
    max_tokens: int = typer.Option(None, "--max-tokens", help="live tokens they may hold (made through the API)"),
    max_disk_bytes: int = typer.Option(None, "--max-disk-bytes", help="disk their run dirs and uploads may take"),
    reset: list[str] = typer.Option([], "--reset", help="limit to put back to the server's setting (repeat)"),
    admin: bool = typer.Option(None, "--admin/--no-admin", help="make or unmake an admin"),
) -> None:
    """Override a user's limits (or --reset them to the server's settings)."""
    given = {
        "max_gpus": max_gpus,
        "max_queued": max_queued,
        "max_runtime_s": max_runtime_s,
        "max_priority": max_priority,
        "submit_rate_per_minute": submit_rate,
        "max_datasets": max_datasets,
        "max_dataset_bytes": max_dataset_bytes,
        "max_tokens": max_tokens,
        "max_disk_bytes": max_disk_bytes,
    }
    changes: dict[str, int | None] = {k: v for k, v in given.items() if v is not None}
    for field in reset:
        field = field.replace("-", "_")
        if field not in LIMIT_FIELDS:
            print_error(f"unknown limit {field!r}; limits: {', '.join(LIMIT_FIELDS)}")
            raise typer.Exit(2)
        changes[field] = None
    with database() as session:  # a UserError: its message, exit 1
        user = set_limits(session, name=name, is_admin=admin, **changes)
        console.print(
            f"{user.name}: " + ", ".join(f"{f}={_limit(getattr(user, f))}" for f in LIMIT_FIELDS),
            markup=False,
            highlight=False,
        )


@tokens_app.command("create")
def tokens_create(
    user: str = typer.Argument(..., help="whose token"),
    name: str = typer.Option("default", "--name", help="a label, e.g. the machine it is for"),
    expires_days: float = typer.Option(None, "--expires-days", min=0.001, help="expire after this many days"),
) -> None:
    """Create a token; it is printed once and never stored (only its hash is)."""
    expires = timedelta(days=expires_days) if expires_days else None
    with database() as session:
        row, token = create_token(session, user_name=user, name=name, expires_in=expires)
        until = f", expires {row.expires_at:%Y-%m-%d %H:%M} UTC" if row.expires_at else ""
        err_console.print(f"token {row.id} for {user}{until}; shown once, store it now:", markup=False)
    print(token)  # alone on stdout, so `TOKEN=$(trainbox-admin tokens create NAME)` works


@tokens_app.command("list")
def tokens_list(user: str = typer.Option(None, "--user", help="only this user's tokens")) -> None:
    """Tokens (id, user, label, state, dates); never the secrets."""
    with database() as session:
        table = Table("id", "user", "name", "state", "created", "expires")
        for t in list_tokens(session, user_name=user):
            table.add_row(
                t.id,
                escape(t.user.name),
                escape(t.name),
                token_status(t),
                f"{t.created_at:%Y-%m-%d %H:%M}",
                f"{t.expires_at:%Y-%m-%d %H:%M}" if t.expires_at else "never",
            )
        console.print(table)


@tokens_app.command("revoke")
def tokens_revoke(token_id: str = typer.Argument(..., help="the token's id (trainbox-admin tokens list)")) -> None:
    """Revoke a token: requests with it get 401 from now on."""
    with database() as session:
        row = revoke_token(session, token_id)
        console.print(f"revoked token {row.id} ({row.name})", markup=False, highlight=False)


app = typer.Typer(
    name="trainbox-admin",
    help="Server-side administration of trainbox: users, their limits and API tokens (acts on the database).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(users_app, name="users")
app.add_typer(tokens_app, name="tokens")

if __name__ == "__main__":
    app()
