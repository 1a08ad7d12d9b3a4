"""Settings: defaults derived from data_dir, env prefix, bad values fail at start."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from core import keys
from core.settings import Settings


def test_defaults_derive_from_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINBOX_DATA_DIR", str(tmp_path))
    s = Settings()
    assert s.database_url == f"sqlite:///{tmp_path / 'trainbox.db'}"
    assert s.runs_root == tmp_path / "runs"
    assert s.model_root == tmp_path / "models"
    assert s.data_root == tmp_path / "data"
    assert s.redis_url is None
    assert s.cpu_slots == 2 and s.box_name
    assert s.run_dir("j1") == tmp_path / "runs" / "j1"


def test_env_prefix_and_postgres_driver(monkeypatch):
    monkeypatch.setenv("TRAINBOX_DATABASE_URL", "postgresql://u@h/db")
    monkeypatch.setenv("TRAINBOX_CPU_SLOTS", "4")
    s = Settings()
    assert s.database_url == "postgresql+psycopg://u@h/db"
    assert s.cpu_slots == 4


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TRAINBOX_CPU_SLOTS": "0"}, "cpu_slots"),
        ({"TRAINBOX_DATABASE_URL": "mysql://x/y"}, "database_url"),
        ({"TRAINBOX_DATABASE_URL": "sqlite:///:memory:"}, "in-memory"),
        ({"TRAINBOX_REDIS_URL": "localhost:6379"}, "redis_url"),
        ({"TRAINBOX_HEARTBEAT_S": "20", "TRAINBOX_LEASE_S": "30"}, "lease_s"),
        ({"TRAINBOX_BOX_NAME": "bad name/"}, "box_name"),
    ],
)
def test_bad_values_fail_with_a_clear_message(monkeypatch, env, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValidationError, match=message):
        Settings()


def test_key_names():
    assert keys.job_events("j1") == "job:j1:events"
    assert keys.box_queue("gpu-box") == "trainbox.box.gpu-box"
