"""Worker tests: a fake trainer for the supervisor, real Redis for the relay, and (e2e) the real stack."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis import Redis

from core.db import session_scope, upgrade
from core.scheduler import GpuInfo, register_box
from core.settings import get_settings
from tests.core.databases import BACKENDS, fresh_database
from tests.helpers import redis_or_skip
from worker.supervisor import Launch

FAKE_TRAINER = Path(__file__).with_name("fake_trainer.py")
RELAY_REDIS_URL = "redis://127.0.0.1:6379/12"
BOX = "test-box"


@pytest.fixture
def make_launch(tmp_path: Path) -> Callable[..., Launch]:
    """A Launch that runs the fake trainer in a fresh run dir; keyword arguments tune it."""

    def make(*args: str, **overrides: Any) -> Launch:
        run_dir = tmp_path / "runs" / "j1"
        run_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, str(FAKE_TRAINER), "--run-dir", str(run_dir), *args]
        fields: dict[str, Any] = dict(
            job_id="j1",
            attempt=1,
            spec={"name": "fake", "gpus": 2},
            run_dir=run_dir,
            devices=[0, 1],
            accelerator="cpu",
            model_root=tmp_path,
            data_root=tmp_path,
            cancel_grace_s=5.0,
            command=command,
        )
        fields.update(overrides)
        return Launch(**fields)

    return make


@pytest.fixture
def fake(monkeypatch) -> dict[str, list[str]]:
    """Make the runner launch the fake trainer with these extra arguments."""
    args: dict[str, list[str]] = {"argv": []}
    from worker import runner

    real = runner.build_launch

    def build(job_id: str, attempt: int) -> Any:
        launch = real(job_id, attempt)
        command = [sys.executable, str(FAKE_TRAINER), "--run-dir", str(launch.run_dir), *args["argv"]]
        return dataclasses.replace(launch, command=command)

    monkeypatch.setattr(runner, "build_launch", build)
    monkeypatch.setattr(runner, "reschedule", lambda: None)
    return args


@pytest.fixture
def redis_url() -> str:
    """The Redis database of the tests here; a test module may override it to keep its own."""
    return RELAY_REDIS_URL


@pytest.fixture
def redis(redis_url: str) -> Iterator[Redis]:
    r = redis_or_skip(redis_url, decode_responses=True)
    r.flushdb()
    yield r
    r.flushdb()
    r.close()


@pytest.fixture(params=BACKENDS)
def db(request, tmp_path, monkeypatch, redis, redis_url) -> Iterator[str]:
    """A migrated database with a 2-slot box, and settings pointing the worker code at it and at `redis_url`."""
    with fresh_database(request.param, tmp_path) as url:
        upgrade(url)
        monkeypatch.setenv("TRAINBOX_DATABASE_URL", url)
        monkeypatch.setenv("TRAINBOX_REDIS_URL", redis_url)
        monkeypatch.setenv("TRAINBOX_DATA_DIR", str(tmp_path / "data"))
        monkeypatch.setenv("TRAINBOX_CANCEL_GRACE_S", "5")
        get_settings.cache_clear()
        with session_scope() as s:
            register_box(s, BOX, [GpuInfo(0, "cpu-slot"), GpuInfo(1, "cpu-slot")])
        yield url
        from core.db import get_engine

        get_engine(url).dispose()
    get_settings.cache_clear()


# --- the real stack (end-to-end tests) -------------------------------------------------------------

E2E_REDIS_URL = "redis://127.0.0.1:6379/13"


def write_corpus(path: Path, records: int = 400, bad_line_at: int | None = None) -> None:
    """A small JSONL corpus; with `bad_line_at`, a line there is not JSON (past what submission inspects)."""
    import json
    import random

    rng = random.Random(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "wizards"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i in range(records):
            if i == bad_line_at:
                f.write("{this is not json\n")
            else:
                f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(60))}) + "\n")


def tiny_spec(name: str, *, gpus: int = 2, steps: int = 20, dataset: str = "corpus.jsonl", **extra: Any) -> dict:
    """A preset:tiny job on CPU ranks."""
    spec = {
        "name": name,
        "model": "preset:tiny",
        "dataset": {"path": dataset},
        "gpus": gpus,
        "seq_len": 64,
        "max_steps": steps,
        "checkpoint_every": 0,
        "deepspeed": {
            "train_batch_size": 4 * gpus,
            "gradient_accumulation_steps": 1,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        },
    }
    spec.update(extra)
    return spec


def start_stack(data_dir: Path, redis_url: str, **settings: str) -> Any:
    """uvicorn + a Celery worker (2 CPU slots) as real processes on SQLite, a corpus in the data root."""
    from client.stack import Stack, StackError, free_port

    r = redis_or_skip(redis_url)
    r.flushdb()
    r.close()
    env = {
        "TRAINBOX_DATABASE_URL": f"sqlite:///{data_dir / 'trainbox.db'}",
        "TRAINBOX_BOX_NAME": "e2e-box",
        "TRAINBOX_CPU_SLOTS": "2",
        "TRAINBOX_SWEEP_INTERVAL_S": "1",
        "TRAINBOX_HEARTBEAT_S": "1",
        "TRAINBOX_LEASE_S": "10",
        "TRAINBOX_CANCEL_GRACE_S": "20",
    }
    env.update({f"TRAINBOX_{k.upper()}": v for k, v in settings.items()})
    s = Stack(data_dir=data_dir, port=free_port(), redis_url=redis_url, extra_env=env)
    write_corpus(data_dir / "data" / "corpus.jsonl")
    write_corpus(data_dir / "data" / "bad.jsonl", records=300, bad_line_at=250)
    try:
        s.start(on_step=lambda _: None)
    except StackError:
        s.stop()
        raise
    return s


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The stack the end-to-end tests share, on Redis db 13."""
    s = start_stack(tmp_path_factory.mktemp("stack"), E2E_REDIS_URL)
    yield s
    s.stop()
    Redis.from_url(E2E_REDIS_URL).flushdb()


@pytest.fixture(scope="session")
def api(stack: Any) -> Iterator[Any]:
    from client.sdk import Client

    with Client(stack.url, stack.token()) as c:
        yield c
