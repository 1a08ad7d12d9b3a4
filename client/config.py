"""Where the CLI finds its server and token, and where it says it found them.

Lookup order (the first that gives a URL wins; docs/CLI.md documents it):
1. `--url` / `--token`;
2. `TRAINBOX_URL` / `TRAINBOX_TOKEN`;
3. the user config `trainbox login URL` wrote: `$XDG_CONFIG_HOME/trainbox/config.json`
   (default `~/.config/trainbox/config.json`);
4. a running `trainbox up`: its record `stack.json` in its data dir (`TRAINBOX_DATA_DIR`, else
   `./.trainbox`), else the one the last `trainbox up` noted for its user in
   `$XDG_STATE_HOME/trainbox/stack.json` (default `~/.local/state/trainbox/stack.json`), which is
   what finds it from any working directory; its token is the data dir's `token` file;
5. `http://127.0.0.1:8000`, with no token.

A token goes only to the server it belongs to: a URL given by flag or environment gets the token
`trainbox login` stored for that URL, or the local stack's when that is the stack's URL; never
another server's.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil

from client.sdk import DEFAULT_URL

CONFIG_FILE = "config.json"
STACK_FILE = "stack.json"  # the same name as client.stack.STACK_FILE (in the data dir)
DEFAULT_DATA_DIR = ".trainbox"


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var, "")
    # The XDG spec: a relative value is invalid and is ignored.
    return Path(value) if value and Path(value).is_absolute() else Path.home() / fallback


def default_data_dir() -> Path:
    """The data dir of `trainbox up` when --data-dir is not given: TRAINBOX_DATA_DIR, else ./.trainbox."""
    return Path(os.environ.get("TRAINBOX_DATA_DIR", DEFAULT_DATA_DIR)).expanduser().resolve()


def normalize_url(url: str) -> str:
    return url.strip().rstrip("/")


class BadUrl(ValueError):
    """A server URL that cannot be used (no http:// or https://, no host); the message says which."""


def check_url(url: str, source: str) -> str:
    """The URL, normalized; BadUrl naming its source when it is not an http(s) URL with a host."""
    url = normalize_url(url)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (a bad port raises here)
    except ValueError as exc:
        raise BadUrl(f"{url!r} (from {source}) is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        hint = f"; did you mean http://{url}?" if "://" not in url else ""
        raise BadUrl(f"{url!r} (from {source}) is not an http:// or https:// URL{hint}")
    return url


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        body = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return body if isinstance(body, dict) else None


def _write_private(path: Path, body: dict[str, Any]) -> None:
    """Write JSON atomically, readable by its user only (it may hold tokens)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(body, f, indent=2)
    tmp.replace(path)


# --- the user config (trainbox login) ---------------------------------------------------------


def config_file() -> Path:
    """What `trainbox login` writes: `$XDG_CONFIG_HOME/trainbox/config.json` (default `~/.config/...`)."""
    return _xdg("XDG_CONFIG_HOME", ".config") / "trainbox" / CONFIG_FILE


def read_config() -> dict[str, Any]:
    """`{"url": the default server, "tokens": {url: token}}`; empty when nobody logged in."""
    body = _read_json(config_file()) or {}
    tokens = body.get("tokens")
    return {"url": body.get("url"), "tokens": tokens if isinstance(tokens, dict) else {}}


def save_login(url: str, token: str) -> Path:
    """Make `url` the default server, with its token; returns the config file."""
    config = read_config()
    config["url"] = normalize_url(url)
    config["tokens"][normalize_url(url)] = token
    _write_private(config_file(), config)
    return config_file()


def forget_login(url: str | None) -> str | None:
    """Drop a server's token (default: the default server's); returns the URL forgotten, if any."""
    config = read_config()
    url = normalize_url(url) if url else config["url"]
    if not url or (url not in config["tokens"] and config["url"] != url):
        return None
    config["tokens"].pop(url, None)
    if config["url"] == url:
        config["url"] = None
    _write_private(config_file(), config)
    return url


# --- the local stack (trainbox up) ------------------------------------------------------------


def stack_pointer() -> Path:
    """Where `trainbox up` notes its data dir for its user (`$XDG_STATE_HOME/trainbox`, default
    `~/.local/state/trainbox`): found from any working directory."""
    return _xdg("XDG_STATE_HOME", ".local/state") / "trainbox" / STACK_FILE


def note_stack(url: str, data_dir: Path, pid: int) -> None:
    """Called by `trainbox up` once it is ready: the CLI finds this stack from any directory."""
    _write_private(stack_pointer(), {"url": url, "data_dir": str(data_dir), "pid": pid})


def forget_stack(data_dir: Path) -> None:
    """Called by `trainbox up` when it stops: the note goes if it is still this stack's."""
    note = _read_json(stack_pointer())
    if note and note.get("data_dir") == str(data_dir):
        with contextlib.suppress(FileNotFoundError):
            stack_pointer().unlink()


def _alive(pid: Any) -> bool:
    return isinstance(pid, int) and pid > 0 and psutil.pid_exists(pid)


@dataclass(frozen=True)
class LocalStack:
    url: str
    data_dir: Path

    @property
    def token_file(self) -> Path:
        return self.data_dir / "token"

    def token(self) -> str | None:
        try:
            return self.token_file.read_text().strip() or None
        except OSError:
            return None


def local_stack() -> LocalStack | None:
    """The running `trainbox up`: the one in the default data dir, else the one its user last started."""
    candidates = [default_data_dir()]
    note = _read_json(stack_pointer())
    if note and isinstance(note.get("data_dir"), str):
        candidates.append(Path(note["data_dir"]))
    for data_dir in candidates:
        record = _read_json(data_dir / STACK_FILE)
        if record and isinstance(record.get("url"), str) and _alive(record.get("pid")):
            return LocalStack(normalize_url(record["url"]), data_dir)
    return None


# --- the lookup -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """The server the CLI talks to, its token, and where each came from (said in errors and `whoami`)."""

    url: str
    url_source: str
    token: str | None
    token_source: str


def resolve(flag_url: str | None = None, flag_token: str | None = None) -> Target:
    """The server and token by the lookup order in this module's docstring (the URL is not checked)."""
    env_url, env_token = os.environ.get("TRAINBOX_URL") or None, os.environ.get("TRAINBOX_TOKEN") or None
    config = read_config()
    stack = local_stack()
    login = f"{config_file()} (trainbox login)"

    if flag_url or env_url:
        url = normalize_url(flag_url or env_url or "")
        url_source = "--url" if flag_url else "TRAINBOX_URL"
    elif config["url"]:
        url, url_source = normalize_url(config["url"]), login
    elif stack is not None:
        url, url_source = stack.url, f"the running trainbox up ({stack.data_dir / STACK_FILE})"
    else:
        url, url_source = DEFAULT_URL, "the default"

    if flag_token:
        return Target(url, url_source, flag_token, "--token")
    if env_token:
        return Target(url, url_source, env_token, "TRAINBOX_TOKEN")
    if config["tokens"].get(url):
        return Target(url, url_source, config["tokens"][url], login)
    if stack is not None and stack.url == url and (token := stack.token()):
        return Target(url, url_source, token, f"the local stack's token file {stack.token_file}")
    return Target(url, url_source, None, "none")
