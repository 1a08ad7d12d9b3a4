"""`trainbox login URL` and `trainbox logout`: the server and token the CLI uses when no flag or
TRAINBOX_ variable names one, stored in the user's config (client.config)."""

from __future__ import annotations

import sys

import typer

from client import config
from client.cli_common import EXIT_USAGE, api_errors, console, fail, options, text, timeout_s
from client.sdk import Client


def login(
    url: str = typer.Argument(..., help="the server, e.g. http://gpu-box:8000"),
    token: str = typer.Option(
        None,
        "--token",
        help="the API token",
        show_default="the root --token or TRAINBOX_TOKEN, else the local stack's for its URL, else asked for",
    ),
) -> None:
    """Store a server and its token as the CLI's default (checked with the server first)."""
    with api_errors():
        url = config.check_url(url, "the argument")
        stack = config.local_stack()
        token = token or options["token"] or None
        source = "given"
        if token is None and stack is not None and stack.url == url:
            token, source = stack.token(), f"the local stack's {stack.token_file}"
        if token is None:
            token = typer.prompt("token", hide_input=True) if sys.stdin.isatty() else sys.stdin.readline()
        token = (token or "").strip()
        if not token:
            raise fail("no token given", EXIT_USAGE)
        with Client(url, token, timeout=timeout_s()) as client:
            me = client.me()
    path = config.save_login(url, token)
    console.print(
        f"logged in to {text(url)} as [bold]{text(me.get('name'))}[/] (token {text(source)}); stored in {text(path)}"
    )


def logout(url: str = typer.Argument(None, help="the server to forget", show_default="the stored default")) -> None:
    """Forget a stored server and its token."""
    forgotten = config.forget_login(url)
    if forgotten is None:
        console.print("nothing stored for that server" if url else "not logged in", markup=False)
        return
    console.print(f"forgot {text(forgotten)} (in {text(config.config_file())})")


def register(app: typer.Typer) -> None:
    """Add `login` and `logout` to the CLI."""
    app.command()(login)
    app.command()(logout)
