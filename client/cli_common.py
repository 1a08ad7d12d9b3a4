"""What the CLI's command modules share: the console, the API client, reading spec files.

Text from the server (names, errors, log lines, paths) is printed literally: escaped with `escape()`
inside markup, or printed with markup off. Rich would otherwise read `[bold]` as a style and stop
with a MarkupError at `[/]`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
import yaml
from rich.console import Console
from rich.markup import escape

from client.sdk import Client, TrainboxError

console = Console()
err_console = Console(stderr=True)

# Set by the root callback from --url / --token (or TRAINBOX_URL / TRAINBOX_TOKEN).
options: dict[str, str | None] = {"url": None, "token": None}


def local_token() -> str | None:
    """The token `trainbox up` wrote into its data dir (TRAINBOX_DATA_DIR, default ./.trainbox)."""
    path = Path(os.environ.get("TRAINBOX_DATA_DIR", ".trainbox")).expanduser() / "token"
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def make_client() -> Client:
    """A client for the API the user pointed the CLI at: --token, TRAINBOX_TOKEN, or the local token."""
    return Client(options["url"], options["token"] or local_token())


def text(value: object) -> str:
    """Server-provided text made safe to put inside rich markup (or a table cell): shown as is."""
    return escape("" if value is None else str(value))


def print_error(message: object) -> None:
    """`error: <message>` on stderr, the message printed literally."""
    err_console.print(f"[red]error:[/] {text(message)}")


@contextmanager
def api_errors() -> Iterator[None]:
    """Turn API and connection errors into a one-line message and exit code 1."""
    try:
        yield
    except TrainboxError as exc:
        print_error(exc)
        raise typer.Exit(1) from None
    except OSError as exc:
        url = options["url"] or "the API"
        print_error(f"cannot reach {url}: {exc} (is `trainbox up` running?)")
        raise typer.Exit(1) from None


class _SpecLoader(yaml.SafeLoader):
    """YAML 1.1 (PyYAML) reads `lr: 1e-4` (no dot) as a string; a spec means the number, as YAML 1.2
    and JSON do (the server takes numbers only: a string is not a learning rate)."""


_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_spec(path: Path) -> dict[str, Any]:
    """Read a JobSpec from a YAML or JSON file."""
    text = path.read_text()
    try:
        spec = json.loads(text) if path.suffix == ".json" else yaml.load(text, Loader=_SpecLoader)
    except (ValueError, yaml.YAMLError) as exc:
        print_error(f"{path} is not valid YAML or JSON: {exc}")
        raise typer.Exit(2) from None
    if not isinstance(spec, dict):
        print_error(f"{path} must hold one JobSpec object")
        raise typer.Exit(2)
    return spec
