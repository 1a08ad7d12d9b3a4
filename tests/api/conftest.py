"""API tests: the real app on SQLite and on a fresh Postgres database, with real Redis (db 9)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from redis import Redis

from api.app import create_app
from core import keys
from core.db import upgrade
from core.settings import Settings
from tests.core.databases import BACKENDS, clear_tables, fresh_database
from tests.helpers import redis_or_skip, serve  # noqa: F401 (serve: tests/api/test_events.py imports it from here)

REDIS_URL = "redis://127.0.0.1:6379/9"


class Dispatched:
    """Records run_job dispatches (the Celery path is tested separately against Redis)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, str]] = []

    def __call__(self, job_id: str, attempt: int, queue: str) -> None:
        self.calls.append((job_id, attempt, queue))


def spec(**overrides: Any) -> dict[str, Any]:
    """A valid JobSpec body (preset model, a dataset under the data root)."""
    body: dict[str, Any] = {
        "name": "tiny-sft",
        "model": "preset:tiny",
        "dataset": {"path": "corpus/train.jsonl"},
        "gpus": 1,
        "seq_len": 64,
        "max_steps": 10,
        "deepspeed": {"train_batch_size": 8, "gradient_accumulation_steps": 2},
    }
    body.update(overrides)
    return body


@pytest.fixture(scope="session")
def redis() -> Iterator[Redis]:
    r = redis_or_skip(REDIS_URL)
    yield r
    r.close()


@pytest.fixture(scope="session", params=BACKENDS)
def api_env(request, tmp_path_factory, redis) -> Iterator[tuple[Settings, Dispatched, TestClient]]:
    root = tmp_path_factory.mktemp(f"api-{request.param}")
    with fresh_database(request.param, root) as url:
        upgrade(url)
        settings = Settings(
            data_dir=root,
            database_url=url,
            redis_url=REDIS_URL,
            sse_block_ms=100,
            submit_rate_per_minute=10000,  # the rate limit's own test lowers it per user
            max_upload_bytes=256 * 1024,
        )
        _make_files(settings)
        dispatched = Dispatched()
        app = create_app(settings, dispatch=dispatched)
        with TestClient(app) as client:
            yield settings, dispatched, client
        app.state.engine.dispose()


def _make_files(settings: Settings) -> None:
    assert settings.data_root and settings.model_root and settings.runs_root
    corpus = settings.data_root / "corpus"
    corpus.mkdir(parents=True)
    lines = [json.dumps({"text": f"example number {i} " * 20}) for i in range(300)]
    (corpus / "train.jsonl").write_text("\n".join(lines) + "\n")
    (corpus / "notes.txt").write_text("plain text\n" * 50)
    (corpus / "bad.jsonl").write_text('{"body": "no text field"}\n')
    model = settings.model_root / "my-llama"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"model_type": "llama", **_tiny_shape()}))
    (settings.model_root / "no-config").mkdir()
    settings.runs_root.mkdir(parents=True)


def _tiny_shape() -> dict[str, int]:
    from trainer.presets import TINY

    return {k: v for k, v in TINY.items() if isinstance(v, int) and not isinstance(v, bool)}


@pytest.fixture
def settings(api_env) -> Settings:
    return api_env[0]


@pytest.fixture
def dispatched(api_env) -> Dispatched:
    return api_env[1]


def make_user(client: TestClient, name: str, *, admin: bool = False) -> dict[str, str]:
    """A user with a fresh token; returns the headers that authenticate as them."""
    from core.users import create_token, create_user

    with client.app.state.sessions() as s:  # type: ignore[attr-defined]
        create_user(s, name=name, is_admin=admin)
        _, token = create_token(s, user_name=name)
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def client(api_env, redis) -> Iterator[TestClient]:
    """The app's client, authenticated as `local`, an admin (tests of rules for others make users)."""
    settings, dispatched, client = api_env
    client.headers.update(make_user(client, "local", admin=True))
    yield client
    client.headers.pop("Authorization", None)
    client.app.state.auth_cache.clear()  # type: ignore[attr-defined]
    rate_keys = list(redis.scan_iter("trainbox:rate:*"))
    if rate_keys:
        redis.delete(*rate_keys)
    app = client.app
    with app.state.sessions() as s:  # type: ignore[attr-defined]
        from sqlalchemy import select

        from core.models import Job

        ids = s.scalars(select(Job.id)).all()
    if ids:
        redis.delete(*[keys.job_events(i) for i in ids])
    clear_tables(app.state.engine)  # type: ignore[attr-defined]
    dispatched.calls.clear()
    assert settings.runs_root is not None
    for child in Path(settings.runs_root).iterdir():
        shutil.rmtree(child, ignore_errors=True)


@pytest.fixture
def clean_uploads(settings):
    """The uploaded files gone after the test (clear_tables removes their rows, not the files)."""
    yield
    uploads = settings.data_root / "uploads"
    if uploads.is_dir():
        for p in uploads.iterdir():
            p.unlink()


@pytest.fixture
def sessions(client):
    return client.app.state.sessions
