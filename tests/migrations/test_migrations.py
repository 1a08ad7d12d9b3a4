"""The schema exists only through migrations: upgrade, compare with the models, downgrade, again."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from core.db import alembic_config, downgrade, make_engine, upgrade
from core.models import Base
from tests.core.databases import BACKENDS, fresh_database

TABLES = {"jobs", "job_metrics", "boxes", "gpus", "users", "api_tokens", "datasets"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_upgrade_matches_models_and_downgrade_is_clean(backend, tmp_path):
    with fresh_database(backend, tmp_path) as url:
        upgrade(url)
        engine = make_engine(url)
        try:
            with engine.connect() as conn:
                assert set(inspect(conn).get_table_names()) >= TABLES
                diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
                assert diff == [], f"models and migrations disagree: {diff}"
                head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
                assert MigrationContext.configure(conn).get_current_revision() == head
            downgrade(url)
            with engine.connect() as conn:
                assert not TABLES & set(inspect(conn).get_table_names())
            upgrade(url)  # and back up: downgrade left nothing behind that blocks a re-run
            upgrade(url)  # idempotent at head
        finally:
            engine.dispose()


def test_single_head():
    script = ScriptDirectory.from_config(alembic_config("sqlite:///unused.db"))
    assert len(script.get_heads()) == 1


def test_python_m_migrations_uses_the_settings(tmp_path):
    """The entry point the compose file's one-shot migrate service runs."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRAINBOX_DATA_DIR": str(tmp_path), "TRAINBOX_DATABASE_URL": ""}
    done = subprocess.run(
        [sys.executable, "-m", "migrations", "upgrade"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    engine = make_engine(f"sqlite:///{tmp_path / 'trainbox.db'}")
    with engine.connect() as conn:
        assert set(inspect(conn).get_table_names()) >= TABLES
    engine.dispose()


@pytest.mark.parametrize("backend", BACKENDS)
def test_0002_adds_users_tokens_datasets_and_reverts_keeping_jobs(backend, tmp_path):
    """A database with jobs from before users existed: 0002 keeps them, and going back to 0001 too."""
    from sqlalchemy import text

    with fresh_database(backend, tmp_path) as url:
        upgrade(url, "0001")
        engine = make_engine(url)
        try:
            with engine.begin() as conn:
                conn.execute(
                    text(
                        "INSERT INTO jobs (id, name, owner, state, spec, gpus, priority, attempt, max_attempts, "
                        "cancel_requested, created_at, updated_at) VALUES ('j1', 'old', 'local', 'queued', '{}', 1, 0, "
                        "1, 3, false, '2026-01-01 00:00:00', '2026-01-01 00:00:00')"
                    )
                )
            upgrade(url, "0002")
            with engine.connect() as conn:
                names = set(inspect(conn).get_table_names())
                assert {"users", "api_tokens", "datasets"} <= names
                assert conn.execute(text("SELECT owner FROM jobs")).scalar() == "local"
            downgrade(url, "0001")
            with engine.connect() as conn:
                assert not {"users", "api_tokens", "datasets"} & set(inspect(conn).get_table_names())
                assert conn.execute(text("SELECT name FROM jobs")).scalar() == "old"
        finally:
            engine.dispose()


@pytest.mark.parametrize("backend", BACKENDS)
def test_0003_gpu_busy_up_and_down_keeps_the_rows(backend, tmp_path):
    from sqlalchemy import text

    with fresh_database(backend, tmp_path) as url:
        upgrade(url, "0002")
        engine = make_engine(url)
        try:
            with engine.begin() as conn:
                conn.execute(
                    text(
                        "INSERT INTO boxes (name, queue, heartbeat_at, created_at) "
                        "VALUES ('b', 'q', '2026-01-01', '2026-01-01')"
                    )
                )
                conn.execute(text("INSERT INTO gpus (box, \"index\", name) VALUES ('b', 0, 'g')"))
            upgrade(url, "0003")
            with engine.connect() as conn:
                assert conn.execute(text("SELECT busy FROM gpus")).scalar_one() in (False, 0)
            downgrade(url, "0002")
            with engine.connect() as conn:
                assert "busy" not in {c["name"] for c in inspect(conn).get_columns("gpus")}
                assert conn.execute(text("SELECT count(*) FROM gpus")).scalar_one() == 1
            upgrade(url, "0003")
        finally:
            engine.dispose()


@pytest.mark.parametrize("backend", BACKENDS)
def test_0005_disk_up_and_down_keeps_jobs_their_metrics_and_users(backend, tmp_path):
    """jobs.disk_bytes and users.max_disk_bytes come and go; no row goes with them (SQLite rebuilds
    the jobs table on the way down, with job_metrics and gpus pointing at it)."""
    from sqlalchemy import text

    with fresh_database(backend, tmp_path) as url:
        upgrade(url, "0004")
        engine = make_engine(url)
        try:
            with engine.begin() as conn:
                conn.execute(
                    text(
                        "INSERT INTO jobs (id, name, owner, state, spec, gpus, priority, attempt, max_attempts, "
                        "cancel_requested, created_at, updated_at) "
                        "VALUES ('j1', 'old', 'ann', 'succeeded', '{}', 1, 0, 1, 3, false, "
                        "'2026-01-01 00:00:00', '2026-01-01 00:00:00')"
                    )
                )
                conn.execute(text("INSERT INTO job_metrics (job_id, attempt, step, time) VALUES ('j1', 1, 1, 1.0)"))
                conn.execute(text("INSERT INTO users (name, is_admin, created_at) VALUES ('ann', false, '2026-01-01')"))
            upgrade(url, "0005")
            with engine.begin() as conn:
                assert conn.execute(text("SELECT disk_bytes FROM jobs")).scalar_one() is None
                assert conn.execute(text("SELECT max_disk_bytes FROM users")).scalar_one() is None
                conn.execute(text("UPDATE jobs SET disk_bytes = 21474836480"))  # 20 GB: past 32 bits
                conn.execute(text("UPDATE users SET max_disk_bytes = 1099511627776"))
                assert conn.execute(text("SELECT disk_bytes FROM jobs")).scalar_one() == 20 << 30
            downgrade(url, "0004")
            with engine.connect() as conn:
                assert "disk_bytes" not in {c["name"] for c in inspect(conn).get_columns("jobs")}
                assert "max_disk_bytes" not in {c["name"] for c in inspect(conn).get_columns("users")}
                assert conn.execute(text("SELECT count(*) FROM job_metrics")).scalar_one() == 1
                assert conn.execute(text("SELECT name FROM jobs")).scalar_one() == "old"
                assert conn.execute(text("SELECT name FROM users")).scalar_one() == "ann"
            upgrade(url, "0005")
        finally:
            engine.dispose()


@pytest.mark.parametrize("backend", BACKENDS)
def test_0004_down_keeps_users_their_tokens_and_uploads(backend, tmp_path):
    """Dropping the quota columns must not cascade: on SQLite a rebuilt users table (batch mode) would
    delete every API token and upload through their foreign keys."""
    from sqlalchemy import text

    with fresh_database(backend, tmp_path) as url:
        upgrade(url, "0004")
        engine = make_engine(url)
        try:
            with engine.begin() as conn:
                conn.execute(
                    text(
                        "INSERT INTO users (name, is_admin, created_at, max_tokens) "
                        "VALUES ('ann', false, '2026-01-01', 5)"
                    )
                )
                uid = conn.execute(text("SELECT id FROM users")).scalar_one()
                conn.execute(
                    text(
                        "INSERT INTO api_tokens (id, user_id, name, secret_hash, created_at) "
                        f"VALUES ('t1', {uid}, 'laptop', '{'0' * 64}', '2026-01-01')"
                    )
                )
                conn.execute(
                    text(
                        "INSERT INTO datasets (id, owner, filename, format, text_field, records, bytes, "
                        f"sha256, created_at) VALUES ('d1', 'ann', 'a.jsonl', 'jsonl', 'text', 1, 10, "
                        f"'{'0' * 64}', '2026-01-01')"
                    )
                )
            downgrade(url, "0003")
            with engine.connect() as conn:
                assert "max_tokens" not in {c["name"] for c in inspect(conn).get_columns("users")}
                assert conn.execute(text("SELECT count(*) FROM api_tokens")).scalar_one() == 1
                assert conn.execute(text("SELECT count(*) FROM datasets")).scalar_one() == 1
            upgrade(url)
        finally:
            engine.dispose()


@pytest.mark.parametrize("backend", BACKENDS)
def test_0007_drops_master_port_and_its_index_keeping_jobs_and_their_metrics(backend, tmp_path):
    """The scheduler no longer hands out rendezvous ports: jobs.master_port and its unique index go;
    on the way down both come back (the column empty) and no row is lost either way."""
    from sqlalchemy import text

    def port_index(conn) -> list[str]:
        return [i["name"] for i in inspect(conn).get_indexes("jobs") if "master_port" in i["column_names"]]

    with fresh_database(backend, tmp_path) as url:
        upgrade(url, "0006")
        engine = make_engine(url)
        try:
            with engine.begin() as conn:
                conn.execute(
                    text(
                        "INSERT INTO jobs (id, name, owner, state, spec, gpus, priority, attempt, max_attempts, "
                        "cancel_requested, created_at, updated_at, box, master_port) VALUES ('j1', 'old', 'ann', "
                        "'running', '{}', 1, 0, 1, 3, false, '2026-01-01 00:00:00', '2026-01-01 00:00:00', 'b', 29500)"
                    )
                )
                conn.execute(text("INSERT INTO job_metrics (job_id, attempt, step, time) VALUES ('j1', 1, 1, 1.0)"))
                assert port_index(conn) == ["uq_jobs_box_master_port"]
            upgrade(url, "0007")
            with engine.connect() as conn:
                assert "master_port" not in {c["name"] for c in inspect(conn).get_columns("jobs")}
                assert port_index(conn) == []
                assert conn.execute(text("SELECT box FROM jobs")).scalar_one() == "b"
                assert conn.execute(text("SELECT count(*) FROM job_metrics")).scalar_one() == 1
            downgrade(url, "0006")
            with engine.connect() as conn:
                assert conn.execute(text("SELECT master_port FROM jobs")).scalar_one() is None
                assert port_index(conn) == ["uq_jobs_box_master_port"]
                assert conn.execute(text("SELECT count(*) FROM job_metrics")).scalar_one() == 1
            upgrade(url)
        finally:
            engine.dispose()
