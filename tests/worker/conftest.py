"""Worker tests: a fake trainer for the supervisor, real Redis for the relay, and (e2e) the real stack."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis import Redis

from worker.supervisor import Launch

FAKE_TRAINER = Path(__file__).with_name("fake_trainer.py")
RELAY_REDIS_URL = "redis://127.0.0.1:6379/12"


@pytest.fixture
def make_launch(tmp_path: Path) -> Callable[..., Launch]:
    """A Launch that runs the fake trainer in a fresh run dir; keyword arguments tune it."""

    def make(*args: str, **overrides: Any) -> Launch:
        run_dir = tmp_path / "runs" / "j1"
        run_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, str(FAKE_TRAINER), "--run-dir", str(run_dir), *args]
        fields: dict[str, Any] = dict(
            job_id="j1", attempt=1, spec={"name": "fake", "gpus": 2}, run_dir=run_dir, devices=[0, 1],
            accelerator="cpu", master_port=29999, model_root=tmp_path, data_root=tmp_path,
            cancel_grace_s=5.0, command=command,
        )  # fmt: skip
        fields.update(overrides)
        return Launch(**fields)

    return make


@pytest.fixture
def redis() -> Iterator[Redis]:
    r = Redis.from_url(RELAY_REDIS_URL, decode_responses=True)
    try:
        r.ping()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"Redis not reachable at {RELAY_REDIS_URL}: {e}")
    r.flushdb()
    yield r
    r.flushdb()
    r.close()
