"""The `trainbox` command line: a typer app whose commands live in sibling modules.

Each command module has `register(app)`; adding a module to COMMAND_MODULES adds its commands.
"""

from __future__ import annotations

import importlib

import typer

from client import cli_common

EPILOG = (
    "Server and token lookup: --url/--token, then TRAINBOX_URL/TRAINBOX_TOKEN, then `trainbox login` "
    "(~/.config/trainbox/config.json), then the running `trainbox up` (./.trainbox, or the one its user "
    "last started), then http://127.0.0.1:8000. `trainbox whoami` shows what was found. " + cli_common.EXIT_CODES_HELP
)

app = typer.Typer(
    name="trainbox",
    help="Share one multi-GPU box for LLM training: submit, follow and manage DeepSpeed jobs.",
    epilog=EPILOG,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

COMMAND_MODULES = [
    "client.cli_jobs",  # submit, validate, list, status, follow, logs, cancel, download, gpus
    "client.cli_stack",  # up, demo
    "client.cli_train",  # train, bench (the trainer on this machine, no service)
    "client.cli_datasets",  # datasets upload/list, queue, whoami
    "client.cli_users",  # users add/list/set, tokens create/list/revoke (admin, on the database)
    "client.cli_service",  # service install (systemd units)
    "client.cli_admin",  # prune (admin, through the API)
    "client.cli_login",  # login, logout
]


@app.callback()
def main(
    url: str = typer.Option(
        None,
        "--url",
        help="API base URL",
        show_default="TRAINBOX_URL, else `trainbox login`'s, else the running `trainbox up`'s, else http://127.0.0.1:8000",
    ),
    token: str = typer.Option(
        None,
        "--token",
        help="API bearer token",
        show_default="TRAINBOX_TOKEN, else the one `trainbox login` stored for the URL, else the local stack's",
    ),
    timeout: float = typer.Option(
        None,
        "--timeout",
        min=0.1,
        help="seconds to wait for each answer",
        show_default=f"TRAINBOX_TIMEOUT, else {cli_common.DEFAULT_TIMEOUT_S:g}",
    ),
) -> None:
    """trainbox: a training queue for one shared GPU box."""
    cli_common.options.update(url=url, token=token, timeout=timeout)


for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)
