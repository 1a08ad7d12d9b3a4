"""core/disk.py on SQLite and Postgres: sizes without following links, per-user totals from the
database, pruning finished jobs' checkpoints, and the disk quota's setting and per-user override."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

from core.disk import disk_usage, disk_usage_by_owner, human_bytes, prune_checkpoints, tree_bytes
from core.models import Dataset, Job, User, utcnow
from core.settings import Settings
from core.users import effective_limits
from tests.core.factories import add_job


def test_tree_bytes_counts_regular_files_and_follows_no_link(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "one").write_bytes(b"x" * 100)
    (tmp_path / "a" / "b" / "two").write_bytes(b"x" * 23)
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (outside / "big").write_bytes(b"x" * 10_000)
    os.symlink(outside, tmp_path / "a" / "linked-dir")
    os.symlink(outside / "big", tmp_path / "a" / "linked-file")
    assert tree_bytes(tmp_path) == 123
    assert tree_bytes(tmp_path / "missing") == 0
    assert human_bytes(20_000_000_000) == "20.0 GB" and human_bytes(999) == "999 B"


def _upload(session, owner: str, size: int, n: int) -> None:
    session.add(
        Dataset(
            id=f"d{owner}{n}",
            owner=owner,
            filename="f",
            format="jsonl",
            text_field="text",
            records=1,
            bytes=size,
            sha256="0" * 64,
            created_at=utcnow(),
        )
    )
    session.commit()


def test_disk_usage_sums_measured_jobs_and_uploads_per_user(session) -> None:
    for name in ("ann", "bob"):
        session.add(User(name=name, created_at=utcnow()))
    session.commit()
    add_job(session, owner="ann", state="succeeded", disk_bytes=20 << 30)  # past 32 bits
    add_job(session, owner="ann", state="running", disk_bytes=1000)
    add_job(session, owner="ann", state="queued")  # never measured
    add_job(session, owner="bob", state="succeeded", disk_bytes=7)
    _upload(session, "ann", 500, 1)
    _upload(session, "ann", 250, 2)
    ann = disk_usage(session, "ann")
    assert (ann.jobs_bytes, ann.uploads_bytes, ann.total_bytes) == ((20 << 30) + 1000, 750, (20 << 30) + 1750)
    assert disk_usage(session, "nobody").total_bytes == 0
    everyone = disk_usage_by_owner(session)
    assert everyone["ann"] == ann and everyone["bob"].total_bytes == 7


def _run_dir(root: Path, job_id: str, steps: tuple[int, ...] = (10, 20)) -> Path:
    run_dir = root / job_id
    for step in steps:
        (run_dir / "checkpoints" / f"step-{step}").mkdir(parents=True)
        (run_dir / "checkpoints" / f"step-{step}" / "shard.pt").write_bytes(b"c" * 1000)
    (run_dir / "checkpoints" / ".tmp-step-30").mkdir()  # a save cut short
    (run_dir / "model").mkdir()
    (run_dir / "model" / "model.safetensors").write_bytes(b"m" * 300)
    (run_dir / "events.jsonl").write_text("{}\n")
    (run_dir / "train.log").write_text("log\n")
    return run_dir


def test_prune_deletes_old_finished_checkpoints_only_and_a_dry_run_nothing(session, tmp_path: Path) -> None:
    old, recent = utcnow() - timedelta(days=10), utcnow() - timedelta(days=2)
    done = add_job(session, state="succeeded", finished_at=old, disk_bytes=1).id
    cancelled = add_job(session, state="cancelled", finished_at=old).id
    young = add_job(session, state="failed", finished_at=recent).id
    running = add_job(session, state="running", started_at=old).id
    linked = add_job(session, state="succeeded", finished_at=old).id
    for j in (done, cancelled, young, running):
        _run_dir(tmp_path, j)
    elsewhere = _run_dir(tmp_path / "elsewhere", "keep")  # a checkpoints dir reached through a link
    (tmp_path / linked).mkdir()
    os.symlink(elsewhere / "checkpoints", tmp_path / linked / "checkpoints")

    dry = prune_checkpoints(session, runs_root=tmp_path, older_than_days=7, dry_run=True)
    assert sorted(p.id for p in dry) == sorted([done, cancelled])
    assert dry[0].checkpoints == ["checkpoints/.tmp-step-30", "checkpoints/step-10", "checkpoints/step-20"]
    assert all(p.bytes == 2000 for p in dry)
    assert (tmp_path / done / "checkpoints" / "step-10").is_dir() and session.get(Job, done).disk_bytes == 1

    real = prune_checkpoints(session, runs_root=tmp_path, older_than_days=7)
    assert [(p.id, p.bytes) for p in real] == [(p.id, p.bytes) for p in dry]
    for j in (done, cancelled):
        assert not (tmp_path / j / "checkpoints").exists()
        assert sorted(p.name for p in (tmp_path / j).iterdir()) == ["events.jsonl", "model", "train.log"]
        session.expire_all()
        assert session.get(Job, j).disk_bytes == 300 + 3 + 4
    for j in (young, running):
        assert (tmp_path / j / "checkpoints" / "step-20" / "shard.pt").is_file()
    assert (elsewhere / "checkpoints" / "step-10" / "shard.pt").is_file()
    assert prune_checkpoints(session, runs_root=tmp_path, older_than_days=7) == []  # nothing left to do
    assert sorted(p.id for p in prune_checkpoints(session, runs_root=tmp_path, older_than_days=0)) == [young]


def test_the_disk_quota_is_the_setting_unless_the_user_has_an_override() -> None:
    user = User(name="ann", is_admin=False)
    assert effective_limits(user, Settings(data_dir=Path("/tmp/x"))).max_disk_bytes is None  # default: no cap
    capped = Settings(data_dir=Path("/tmp/x"), max_disk_bytes_per_user=100 << 30)
    assert effective_limits(user, capped).max_disk_bytes == 100 << 30
    user.max_disk_bytes = 500 << 30
    assert effective_limits(user, capped).max_disk_bytes == 500 << 30
