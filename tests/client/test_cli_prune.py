"""`trainbox prune` through the SDK against a served API (SQLite), and `trainbox-admin users set --max-disk-bytes`."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from sqlalchemy import update

from core.db import session_scope
from core.jobs import create_job
from core.models import Job, utcnow
from core.settings import get_settings
from tests.client import test_cli_users
from tests.client.test_cli_users import tb
from tests.core.test_admin import tb as admin  # trainbox-admin, on the database
from trainer.spec import JobSpec

served = test_cli_users.served  # the fixture: an API served on SQLite (data_dir: tests/conftest.py)


def _finished_job_with_checkpoints(days_ago: float) -> str:
    spec = JobSpec.model_validate(
        {
            "name": "old",
            "model": "preset:tiny",
            "dataset": {"path": "x.jsonl"},
            "gpus": 1,
            "deepspeed": {"train_batch_size": 2},
        }
    )
    with session_scope() as s:
        job_id = create_job(session=s, owner="admin", spec=spec).job.id
        s.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(state="succeeded", finished_at=utcnow() - timedelta(days=days_ago), disk_bytes=12345)
        )
    run_dir = get_settings().run_dir(job_id)
    for step in (10, 20):
        (run_dir / "checkpoints" / f"step-{step}").mkdir(parents=True)
        (run_dir / "checkpoints" / f"step-{step}" / "mp_rank_00_model_states.pt").write_bytes(b"w" * 3000)
    (run_dir / "model").mkdir()
    (run_dir / "model" / "model.safetensors").write_bytes(b"m" * 100)
    return job_id


@pytest.mark.usefixtures("data_dir")
def test_prune_dry_run_then_for_real(served):
    admin("users", "add", "root", "--admin")
    token = admin("tokens", "create", "root").stdout.strip()
    old, recent = _finished_job_with_checkpoints(30), _finished_job_with_checkpoints(1)
    api = ("--url", served, "--token", token)

    dry = tb(*api, "prune", "--older-than-days", "7", "--dry-run").stdout
    assert old in dry and recent not in dry and "step-10, step-20" in dry
    assert "would free 6.0 KB (6000 bytes)" in dry and "dry run: nothing deleted" in dry
    assert (get_settings().run_dir(old) / "checkpoints" / "step-10").is_dir()

    done = json.loads(tb(*api, "prune", "--older-than-days", "7", "--json").stdout)
    assert done["dry_run"] is False and done["bytes_freed"] == 6000 and [j["id"] for j in done["jobs"]] == [old]
    assert not (get_settings().run_dir(old) / "checkpoints").exists()
    assert (get_settings().run_dir(old) / "model" / "model.safetensors").is_file()
    assert (get_settings().run_dir(recent) / "checkpoints" / "step-20").is_dir()
    assert "freed 0 B (0 bytes)" in tb(*api, "prune", "--older-than-days", "7").stdout
    status = tb(*api, "status", old).stdout
    assert "disk 100 bytes" in status

    no_age = tb(*api, "prune", ok=False)  # the server has no retention setting
    assert no_age.exit_code == 8 and "TRAINBOX_CHECKPOINT_RETENTION_DAYS" in no_age.stderr
    admin("users", "add", "ann")
    ann = admin("tokens", "create", "ann").stdout.strip()
    refused = tb("--url", served, "--token", ann, "prune", "--older-than-days", "0", ok=False)
    assert refused.exit_code == 1 and "only an admin" in refused.stderr


@pytest.mark.usefixtures("data_dir")
def test_users_set_max_disk_bytes_and_whoami_shows_the_disk(served):
    admin("users", "add", "ann")
    assert "max_disk_bytes=5000000000" in admin("users", "set", "ann", "--max-disk-bytes", "5000000000").stdout
    assert "5000000000" in admin("users", "list").stdout
    token = admin("tokens", "create", "ann").stdout.strip()
    me = tb("--url", served, "--token", token, "whoami").stdout
    assert "max_disk_bytes" in me and "5000000000" in me and "disk in use" in me and "0 bytes" in me
    assert "max_disk_bytes=-" in admin("users", "set", "ann", "--reset", "max-disk-bytes").stdout
