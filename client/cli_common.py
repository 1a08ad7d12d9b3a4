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

import httpx
import typer
import yaml
from rich.console import Console
from rich.markup import escape

from client import config
from client.config import BadUrl, Target
from client.hints import explain_422
from client.sdk import Client, TrainboxError, format_detail

console = Console()
err_console = Console(stderr=True)

# Set by the root callback from --url, --token and --timeout; the environment and the user config
# are read by client.config.resolve().
options: dict[str, Any] = {"url": None, "token": None, "timeout": None}

# Exit codes: each expected failure has its own (the root --help lists them; docs/CLI.md too).
EXIT_FAILED = 1  # the job ended failed or cancelled; an API error not listed below (403, 409, 429, 5xx)
EXIT_USAGE = 2  # bad arguments or an unreadable spec file (click's own code for usage errors)
EXIT_UNREACHABLE = 3  # nothing answers at the URL (connection refused, unknown host, connection lost)
EXIT_BAD_URL = 4  # the URL is not an http:// or https:// URL
EXIT_TIMEOUT = 5  # the server did not answer in time (--timeout)
EXIT_AUTH = 6  # 401: no token, or a wrong, revoked or expired one
EXIT_NOT_FOUND = 7  # 404: no such job (or not yours), dataset or artifact
EXIT_INVALID = 8  # 422: the spec or a parameter is not valid (the message says what and where)
EXIT_INTERRUPTED = 130  # Ctrl-C while following (the job goes on), as shells count SIGINT
EXIT_CODES_HELP = (
    "Exit codes: 0 ok; 1 the job failed or was cancelled, or another API error; 2 bad arguments or spec "
    "file; 3 server unreachable; 4 bad URL; 5 timeout; 6 token rejected (401); 7 not found (404); "
    "8 invalid request (422); 130 Ctrl-C while following (the job goes on)."
)
DEFAULT_TIMEOUT_S = 30.0
_STATUS_EXIT = {401: EXIT_AUTH, 404: EXIT_NOT_FOUND, 422: EXIT_INVALID}


def target() -> Target:
    """The server and token this command uses, and where each came from (client.config's lookup)."""
    return config.resolve(options["url"], options["token"])


def timeout_s() -> float:
    if options["timeout"] is not None:
        return float(options["timeout"])
    try:
        return float(os.environ.get("TRAINBOX_TIMEOUT", DEFAULT_TIMEOUT_S))
    except ValueError:
        return DEFAULT_TIMEOUT_S


def make_client() -> Client:
    """A client for the server the lookup order finds (flags, environment, login, the local stack)."""
    found = target()
    url = config.check_url(found.url, found.url_source)
    return Client(url, found.token or "", timeout=timeout_s())


def text(value: object) -> str:
    """Server-provided text made safe to put inside rich markup (or a table cell): shown as is."""
    return escape("" if value is None else str(value))


def plain(line: object, **kwargs: Any) -> None:
    """Text printed as it is: no markup read in it, no highlighting (the server's text, and lines with it)."""
    console.print(line, markup=False, highlight=False, **kwargs)


def print_error(message: object) -> None:
    """`error: <message>` on stderr, the message printed literally."""
    err_console.print(f"[red]error:[/] {text(message)}", soft_wrap=True, highlight=False)


def fail(message: object, code: int) -> typer.Exit:
    """Print the one-line error and return the Exit to raise."""
    print_error(message)
    return typer.Exit(code)


def describe(exc: TrainboxError) -> str:
    """An API error as one line: the server's message, with what the CLI knows to add."""
    status = exc.status_code
    if status == 422:
        return f"HTTP 422: {explain_422(exc.detail)}"
    message = f"HTTP {status}: {format_detail(exc.detail)}"
    if status == 401:
        found = target()
        if found.token is None:
            return (
                f"{message} (no token was sent to {found.url}: pass --token, set TRAINBOX_TOKEN, or run "
                f"`trainbox login {found.url}`)"
            )
        return f"{message} (token from {found.token_source}, server {found.url} from {found.url_source})"
    return message


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    match = re.search(r"\[Errno -?\d+\] (.+)$", text)
    return (match[1] if match else text or type(exc).__name__).rstrip(".").lower()


@contextmanager
def api_errors() -> Iterator[None]:
    """Turn the expected failures (API errors, an unreachable server, a bad URL, a timeout) into one line
    on stderr and their exit code; no traceback."""
    try:
        yield
    except TrainboxError as exc:
        raise fail(describe(exc), _STATUS_EXIT.get(exc.status_code, EXIT_FAILED)) from None
    except BadUrl as exc:
        raise fail(exc, EXIT_BAD_URL) from None
    except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
        found = target()
        raise fail(f"{found.url!r} (from {found.url_source}) is not usable: {exc}", EXIT_BAD_URL) from None
    except httpx.TimeoutException:
        found = target()
        raise fail(
            f"{found.url} (from {found.url_source}) did not answer within {timeout_s():g}s "
            "(--timeout or TRAINBOX_TIMEOUT allow longer)",
            EXIT_TIMEOUT,
        ) from None
    except (httpx.TransportError, OSError) as exc:
        found = target()
        where = f"{found.url} (from {found.url_source})"
        if found.url_source == "the default" or "running trainbox up" in found.url_source:
            advice = (
                "start the stack with `trainbox up`, or point the CLI at a server "
                "with --url, TRAINBOX_URL or `trainbox login URL`"
            )
        else:
            advice = "is the server running, and is the URL right?"
        raise fail(f"cannot reach {where}: {_reason(exc)}; {advice}", EXIT_UNREACHABLE) from None


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


def duration(seconds: object) -> str:
    """Seconds as people read them: 45s, 12m 5s, 3h 5m, 2d 4h; "" for no number."""
    if not isinstance(seconds, int | float) or seconds != seconds:
        return ""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s" if s % 60 else f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def when(value: object) -> str:
    """An API time as people read it: `2026-01-02 03:04:05` (UTC); "" for none."""
    return str(value or "")[:19].replace("T", " ")


def gpus_cell(job: dict[str, Any]) -> str:
    """How many GPUs a job asked for, and which it holds: `2 (ids 0,1)` while it holds them, `2` else."""
    count = "" if job.get("gpus") is None else str(job["gpus"])
    ids = job.get("gpu_ids") or []
    return f"{count} (ids {','.join(str(g) for g in ids)})".strip() if ids else count
