"""Engine behaviour: SQLite pragmas and which transactions take the write lock."""

from __future__ import annotations

import sqlite3

import pytest
from sqlalchemy import text

from core.db import make_engine, make_sessionmaker, session_scope, upgrade

INSERT_BOX = "INSERT INTO boxes (name, queue, heartbeat_at, created_at) VALUES (:name, 'q', '2026-01-01', '2026-01-01')"


@pytest.fixture
def sqlite_url(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    return url, tmp_path / "db.sqlite"


def can_write_now(path) -> bool:
    conn = sqlite3.connect(path, timeout=0.05, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        conn.close()


def test_sqlite_pragmas(sqlite_url):
    engine = make_engine(sqlite_url[0])
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 30000
    engine.dispose()


def test_writer_sessions_lock_at_begin_readers_do_not(sqlite_url):
    url, path = sqlite_url
    engine = make_engine(url)
    with make_sessionmaker(engine)() as s:
        s.execute(text("SELECT 1 FROM jobs"))
        assert not can_write_now(path)  # read-then-write cannot fail on a stale snapshot
    assert can_write_now(path)
    with make_sessionmaker(engine, read_only=True)() as s:
        s.execute(text("SELECT 1 FROM jobs"))
        assert can_write_now(path)
    with session_scope(engine, read_only=True) as s:
        s.execute(text("SELECT 1 FROM jobs"))
        assert can_write_now(path)
    engine.dispose()


def test_session_scope_commits_and_rolls_back(sqlite_url):
    engine = make_engine(sqlite_url[0])
    with session_scope(engine) as s:
        s.execute(text(INSERT_BOX), {"name": "a"})
    with pytest.raises(RuntimeError), session_scope(engine) as s:
        s.execute(text(INSERT_BOX), {"name": "b"})
        raise RuntimeError
    with session_scope(engine) as s:
        assert s.execute(text("SELECT name FROM boxes")).scalars().all() == ["a"]
    engine.dispose()
