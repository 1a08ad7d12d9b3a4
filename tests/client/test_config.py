"""Where the CLI finds its server and token (client.config): the lookup order, a token only for its
own server, the running `trainbox up` found from any directory, and URLs checked before use."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from client import config
from client.sdk import Client
from client.stack import Stack


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for key in ("TRAINBOX_URL", "TRAINBOX_TOKEN", "TRAINBOX_DATA_DIR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path)


def _stack(tmp_path, url: str, token: str, pid: int | None = None):
    """A data dir as a running `trainbox up` leaves it: its record (with a live pid) and its token."""
    data_dir = tmp_path / "stack-data"
    data_dir.mkdir(exist_ok=True)
    (data_dir / "stack.json").write_text(json.dumps({"url": url, "pid": pid or os.getpid()}))
    (data_dir / "token").write_text(token + "\n")
    config.note_stack(url, data_dir, pid or os.getpid())
    return data_dir


@pytest.mark.usefixtures("clean_env")
def test_the_lookup_order(tmp_path, monkeypatch):
    assert config.resolve() == config.Target("http://127.0.0.1:8000", "the default", None, "none")

    data_dir = _stack(tmp_path, "http://127.0.0.1:8300", "stack-token")
    found = config.resolve()
    assert (found.url, found.token) == ("http://127.0.0.1:8300", "stack-token")
    assert str(data_dir / "stack.json") in found.url_source and str(data_dir / "token") in found.token_source

    config.save_login("http://gpu-box:8000/", "login-token")
    assert (config.resolve().url, config.resolve().token) == ("http://gpu-box:8000", "login-token")

    monkeypatch.setenv("TRAINBOX_URL", "http://127.0.0.1:8300")  # the stack's URL: the stack's token
    assert config.resolve().token == "stack-token" and config.resolve().url_source == "TRAINBOX_URL"
    monkeypatch.setenv("TRAINBOX_URL", "http://elsewhere:8000")  # no token of another server goes there
    assert config.resolve().token is None
    monkeypatch.setenv("TRAINBOX_TOKEN", "env-token")
    assert config.resolve() == config.Target("http://elsewhere:8000", "TRAINBOX_URL", "env-token", "TRAINBOX_TOKEN")
    assert config.resolve("http://flag:1", "flag-token") == config.Target(
        "http://flag:1", "--url", "flag-token", "--token"
    )

    assert config.forget_login(None) == "http://gpu-box:8000"
    monkeypatch.delenv("TRAINBOX_URL")
    monkeypatch.delenv("TRAINBOX_TOKEN")
    assert config.resolve().url == "http://127.0.0.1:8300"  # back to the running stack


@pytest.mark.usefixtures("clean_env")
def test_a_stack_that_is_gone_is_not_used(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _stack(tmp_path, "http://127.0.0.1:8300", "stack-token", pid=dead.pid)
    assert config.resolve().url == "http://127.0.0.1:8000"


@pytest.mark.usefixtures("clean_env")
def test_a_noted_stack_is_found_from_any_directory_until_it_is_forgotten(tmp_path):
    stack = Stack(data_dir=tmp_path / "data", port=8311)
    stack.data_dir.mkdir()
    (stack.data_dir / "token").write_text("tok")
    stack.record()  # the record in its data dir names its token file
    assert json.loads(stack.stack_file.read_text())["token_file"] == str(stack.data_dir / "token")
    config.note_stack(stack.url, stack.data_dir, os.getpid())  # what `trainbox up` adds once it is ready
    note = json.loads(config.stack_pointer().read_text())
    assert note == {"url": "http://127.0.0.1:8311", "data_dir": str(stack.data_dir), "pid": os.getpid()}
    assert config.stack_pointer().stat().st_mode & 0o077 == 0
    other = tmp_path / "somewhere" / "else"
    other.mkdir(parents=True)
    os.chdir(other)
    assert config.resolve() == config.Target(
        "http://127.0.0.1:8311",
        f"the running trainbox up ({stack.stack_file})",
        "tok",
        f"the local stack's token file {stack.data_dir / 'token'}",
    )
    with Client.discover() as client:  # the SDK finds it the same way
        assert client.base_url == "http://127.0.0.1:8311" and client.http.headers["Authorization"] == "Bearer tok"
    config.forget_stack(tmp_path / "another-stack")  # not its note: kept
    assert config.stack_pointer().exists()
    config.forget_stack(stack.data_dir)
    assert not config.stack_pointer().exists() and config.resolve().url == "http://127.0.0.1:8000"


def test_urls_are_checked():
    assert config.check_url("http://h:8000/", "x") == "http://h:8000"
    for bad, says in [
        ("127.0.0.1:8000", "did you mean http://127.0.0.1:8000?"),
        ("localhost:8000", "did you mean http://localhost:8000?"),
        ("ftp://h", "not an http:// or https:// URL"),
        ("http://h:99999", "is not a URL"),
        ("http://", "not an http:// or https:// URL"),
    ]:
        with pytest.raises(config.BadUrl, match="from TRAINBOX_URL") as err:
            config.check_url(bad, "TRAINBOX_URL")
        assert says in str(err.value)
