"""`trainbox users/tokens` on the database, and `whoami`, `datasets`, `queue` against a served API."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from typer.testing import CliRunner

from client.cli import app
from core.settings import Settings, get_settings
from tests.helpers import wait_for

runner = CliRunner()


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Iterator[Path]:
    for key in ("TRAINBOX_URL", "TRAINBOX_TOKEN", "TRAINBOX_DATABASE_URL", "TRAINBOX_REDIS_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("TRAINBOX_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "200")
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


def tb(*args: str, ok: bool = True):
    result = runner.invoke(app, list(args))
    if ok:
        assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result


def test_users_and_tokens_on_the_database(data_dir):
    assert "added user ann" in tb("users", "add", "ann").stdout
    tb("users", "add", "root", "--admin")
    dup = tb("users", "add", "ann", ok=False)
    assert dup.exit_code == 1 and "already exists" in dup.stderr
    created = tb("tokens", "create", "ann", "--name", "laptop", "--expires-days", "1")
    token = created.stdout.strip()
    assert token.startswith("tbx_") and len(token.splitlines()) == 1 and "shown once" in created.stderr
    token_id, secret = token.split("_")[1], token.split("_", 2)[2]
    listed = tb("tokens", "list").stdout
    assert token_id in listed and "laptop" in listed and "active" in listed and secret not in listed
    assert "max_gpus=2" in tb("users", "set", "ann", "--max-gpus", "2", "--max-priority", "3").stdout
    assert "max_gpus=-" in tb("users", "set", "ann", "--reset", "max-gpus").stdout
    quota = tb("users", "set", "ann", "--max-datasets", "3", "--max-dataset-bytes", "1000000", "--max-tokens", "4")
    assert "max_datasets=3" in quota.stdout and "max_dataset_bytes=1000000" in quota.stdout
    assert "max_tokens=4" in quota.stdout
    unknown = tb("users", "set", "[/]x", "--max-gpus", "1", ok=False)  # printed as is, not read as markup
    assert unknown.exit_code == 1 and "no user named '[/]x'" in unknown.stderr
    assert tb("users", "set", "ann", "--reset", "nonsense", ok=False).exit_code == 2
    table = tb("users", "list").stdout
    assert "ann" in table and "root" in table and "yes" in table
    assert "revoked" in tb("tokens", "revoke", token_id).stdout
    assert "revoked" in tb("tokens", "list", "--user", "ann").stdout
    assert tb("tokens", "revoke", "nope", ok=False).exit_code == 1
    assert tb("tokens", "create", "nobody", ok=False).exit_code == 1


@pytest.fixture
def served(data_dir) -> Iterator[str]:
    """The API on a real socket, on the data dir's SQLite database, without Redis."""
    from api.app import create_app
    from core.db import upgrade

    settings = Settings(data_dir=data_dir)
    upgrade(settings.database_url)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    api = create_app(settings, dispatch=None)
    server = uvicorn.Server(uvicorn.Config(api, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_for(lambda: server.started, timeout=10, what="uvicorn start")
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(10)
    api.state.engine.dispose()


def test_whoami_datasets_and_queue_with_a_token(served, data_dir):
    tb("users", "add", "ann")
    token = tb("tokens", "create", "ann").stdout.strip()
    refused = tb("--url", served, "whoami", ok=False)
    assert refused.exit_code == 1 and "missing bearer token" in refused.stderr
    me = tb("--url", served, "--token", token, "whoami").stdout
    assert "ann" in me and "max_priority" in me
    corpus = data_dir / "mine.jsonl"
    corpus.write_text('{"text": "hello there"}\n' * 5)
    uploaded = tb("--url", served, "--token", token, "datasets", "upload", str(corpus)).stdout
    dataset_id = uploaded.split()[1]
    assert dataset_id.startswith("d") and "5 records" in uploaded
    assert dataset_id in tb("--url", served, "--token", token, "datasets", "list").stdout
    assert "name" in tb("--url", served, "--token", token, "queue").stdout


def test_the_cli_finds_the_local_admin_token(served, data_dir):
    from core.db import session_scope
    from core.users import ensure_local_token

    with session_scope() as session:
        ensure_local_token(session, get_settings())
    assert "admin (admin)" in tb("--url", served, "whoami").stdout
