"""The job commands against a served API (SQLite, real Redis): server text is printed literally, and
`trainbox list` pages with --cursor."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis
from typer.testing import CliRunner

from client.cli import app
from client.sdk import Client
from core import events, keys
from core.models import Job, utcnow
from core.scheduler import GpuInfo, register_box
from core.settings import Settings, get_settings
from tests.helpers import redis_or_skip, serve

REDIS_URL = "redis://127.0.0.1:6379/6"  # the client tests' own DB
runner = CliRunner()

# What rich would read as markup: a style, a closing tag with nothing open (MarkupError), a colour.
NAME = "[bold]n[/]"
ERROR = "boom [/] [bold]x[/bold] [red]"
LOG = "[bold]log line[/] [/]"


@pytest.fixture
def served(tmp_path, monkeypatch) -> Iterator[tuple[str, Settings]]:
    """The API on a real socket: the data dir's SQLite database and a real Redis."""
    from api.app import create_app
    from core.db import upgrade

    for key in ("TRAINBOX_URL", "TRAINBOX_TOKEN", "TRAINBOX_DATABASE_URL", "TRAINBOX_REDIS_URL", "TRAINBOX_TIMEOUT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("TRAINBOX_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "200")
    get_settings.cache_clear()
    redis_or_skip(REDIS_URL)
    settings = Settings(data_dir=tmp_path, redis_url=REDIS_URL, sse_block_ms=100)
    upgrade(settings.database_url)
    with serve(create_app(settings, dispatch=None)) as url:
        yield url, settings
    get_settings.cache_clear()


def tb(url: str, token: str, *args: str, code: int = 0):
    result = runner.invoke(app, ["--url", url, "--token", token, *args])
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def _user(name: str) -> str:
    from core.db import session_scope
    from core.users import create_token, create_user

    with session_scope() as s:
        create_user(s, name=name)
        return create_token(s, user_name=name)[1]


def _job(owner: str, state: str, **fields) -> str:
    """A job row as the service stores it (names and errors as another client or the trainer wrote them)."""
    from core.db import session_scope

    with session_scope() as s:
        job = Job(name=NAME, owner=owner, state=state, spec={"name": "x"}, gpus=1, priority=0, **fields)
        s.add(job)
        s.commit()
        return job.id


def test_server_text_with_markup_is_printed_literally(served, tmp_path):
    url, settings = served
    token = _user("ann")
    failed = _job(
        "ann",
        "failed",
        finished_at=utcnow(),
        error={"type": "train_error", "message": ERROR, "log_tail": LOG},
    )
    running = _job("ann", "running", gpu_ids=[0], box="box1", started_at=utcnow())
    from core.db import session_scope

    with session_scope() as s:
        register_box(s, "box1", [GpuInfo(0, "[bold]GPU[/] [/]", 24564)])
        s.get(Job, running).box = "box1"
        from core.models import Gpu

        for gpu in s.query(Gpu).all():
            gpu.job_id = running
        s.commit()

    status = tb(url, token, "status", failed).stdout
    assert ERROR in status and LOG in status
    followed = tb(url, token, "follow", failed, code=1).stdout
    assert ERROR in followed
    listed = tb(url, token, "list").stdout
    assert listed.count(NAME) == 2
    assert NAME in tb(url, token, "queue").stdout
    gpus = tb(url, token, "gpus").stdout
    assert "[bold]GPU[/] [/]" in gpus

    # Live: the progress bar's description is the name; checkpoint paths and log lines are server text.
    r = Redis.from_url(REDIS_URL)
    try:
        for event in (
            {"type": "step", "step": 1, "loss": 2.5, "tokens_per_s": 100.0},
            {"type": "checkpoint", "step": 1, "path": "checkpoints/[/]step-1"},
            {"type": "log", "lines": [LOG]},
            {"type": "state", "state": "failed"},
        ):
            events.publish(r, running, event, maxlen=1000)
        live = tb(url, token, "follow", running, "--logs", code=1).stdout
        assert "checkpoints/[/]step-1" in live and LOG in live and NAME in live
    finally:
        r.delete(keys.job_events(running))
        r.close()

    corpus = tmp_path / "mine.jsonl"
    corpus.write_text('{"text": "hello"}\n')
    refused = tb(url, token, "datasets", "upload", str(corpus), "--text-field", "[/]x", code=8)
    assert "'[/]x'" in refused.stderr


def test_list_pages_with_cursor(served, tmp_path):
    url, _ = served
    token = _user("ann")
    corpus = tmp_path / "mine.jsonl"
    corpus.write_text('{"text": "hello there"}\n' * 20)
    with Client(url, token) as client:
        dataset = client.upload_dataset(corpus)["id"]
        body = {
            "model": "preset:tiny",
            "dataset": {"id": dataset},
            "gpus": 1,
            "seq_len": 16,
            "max_steps": 2,
            "deepspeed": {"train_batch_size": 2},
            "max_runtime_s": 600,
        }
        ids = [client.submit({**body, "name": f"page-{i}"})["id"] for i in range(3)]
    first = tb(url, token, "list", "-n", "2").stdout
    assert "page-2" in first and "page-1" in first and "page-0" not in first
    cursor = first.split("more: --cursor ")[1].split()[0]
    second = tb(url, token, "list", "-n", "2", "--cursor", cursor).stdout
    assert "page-0" in second and "page-1" not in second and "more:" not in second
    assert ids[0] in second
    bad = tb(url, token, "list", "--cursor", "nonsense", code=8)
    assert "cursor" in bad.stderr


def test_datasets_delete(served, tmp_path):
    url, settings = served
    token = _user("ann")
    corpus = tmp_path / "mine.jsonl"
    corpus.write_text('{"text": "hello there"}\n' * 5)
    dataset_id = tb(url, token, "datasets", "upload", str(corpus)).stdout.split()[1]
    assert Path(settings.data_root, "uploads", dataset_id).is_file()
    assert f"deleted {dataset_id}" in tb(url, token, "datasets", "delete", dataset_id).stdout
    assert not Path(settings.data_root, "uploads", dataset_id).exists()
    assert dataset_id not in tb(url, token, "datasets", "list").stdout
    missing = tb(url, token, "datasets", "delete", dataset_id, code=7)
    assert "no uploaded dataset" in missing.stderr
