"""`whoami`, `datasets`, `queue` against a served API; `users` and `tokens` point at `trainbox-admin`."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest
from typer.testing import CliRunner

from client.cli import app
from core.db import get_engine, session_scope
from core.settings import Settings, get_settings
from tests.helpers import serve

runner = CliRunner()


def tb(*args: str, ok: bool = True):
    result = runner.invoke(app, list(args))
    if ok:
        assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result


def test_users_and_tokens_point_at_the_server_command(data_dir):
    for group in ("users", "tokens"):
        moved = tb(group, "add", "ann", ok=False)
        assert moved.exit_code == 2 and f"trainbox-admin {group}" in moved.stderr


@pytest.fixture
def served(data_dir) -> Iterator[str]:
    """The API on a real socket, on the data dir's SQLite database, without Redis."""
    from api.app import create_app
    from core.db import upgrade

    settings = Settings(data_dir=data_dir)
    upgrade(settings.database_url)
    with serve(create_app(settings, dispatch=None)) as url:
        yield url


def test_whoami_datasets_and_queue_with_a_token(served, data_dir):
    from core.users import create_token, create_user

    with session_scope(get_engine(Settings(data_dir=data_dir).database_url)) as session:
        create_user(session, name="ann")
        _, token = create_token(session, user_name="ann")
    refused = tb("--url", served, "whoami", ok=False)
    assert refused.exit_code == 6 and "missing bearer token" in refused.stderr
    assert "no token was sent" in refused.stderr and "trainbox login" in refused.stderr
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
    # The record `trainbox up` keeps in its data dir, with a live pid (this one) and its URL.
    (data_dir / "stack.json").write_text(json.dumps({"url": served, "pid": os.getpid()}))
    found = tb("--url", served, "whoami").stdout
    assert "admin (admin)" in found and f"token from the local stack's token file {data_dir / 'token'}" in found
    # Another server never gets the local stack's token.
    other = served.replace("127.0.0.1", "localhost")
    refused = tb("--url", other, "whoami", ok=False)
    assert refused.exit_code == 6 and "no token was sent" in refused.stderr
