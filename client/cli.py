"""The `trainbox` command line: a typer app whose commands live in sibling modules.

Each command module has `register(app)`; adding a module to COMMAND_MODULES adds its commands.
"""

from __future__ import annotations

import importlib

import typer

from client import cli_common

app = typer.Typer(
    name="trainbox",
    help="Share one multi-GPU box for LLM training: submit, follow and manage DeepSpeed jobs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

COMMAND_MODULES = [
    "client.cli_jobs",  # submit, list, status, follow, logs, cancel, gpus
    "client.cli_stack",  # up, demo
    "client.cli_train",  # train, bench (the trainer on this machine, no service)
    "client.cli_datasets",  # datasets upload/list, queue, whoami
    "client.cli_users",  # users add/list/set, tokens create/list/revoke (admin, on the database)
    "client.cli_service",  # service install (systemd units)
    "client.cli_admin",  # prune (admin, through the API)
]


@app.callback()
def main(
    url: str = typer.Option(None, "--url", envvar="TRAINBOX_URL", help="API base URL [default: http://127.0.0.1:8000]"),
    token: str = typer.Option(None, "--token", envvar="TRAINBOX_TOKEN", help="API bearer token"),
) -> None:
    """trainbox: a training queue for one shared GPU box."""
    cli_common.options.update(url=url, token=token)


for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)
