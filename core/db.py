"""Database engines and sessions for SQLite (embedded) and PostgreSQL (production).

One session per unit of work: `with session_scope() as session: ...` commits on success and rolls
back on error. The schema comes only from migrations: `upgrade(url)` runs `alembic upgrade head`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from core.settings import get_settings, normalize_database_url

SQLITE_BUSY_TIMEOUT_MS = 30_000

# Execution option read by the SQLite "begin" hook. Transactions default to IMMEDIATE (the write
# lock is taken at BEGIN): a DEFERRED transaction that reads and then writes fails at once with
# "database is locked" when another connection wrote in between (WAL cannot upgrade a stale
# snapshot, and the busy timeout does not apply). Pure readers use DEFERRED (`read_only=True`).
SQLITE_BEGIN = "sqlite_begin"


def make_engine(url: str, **kwargs: Any) -> Engine:
    """A new engine: SQLite gets WAL, foreign keys and a busy timeout; Postgres uses psycopg 3."""
    url = normalize_database_url(url)
    if url.startswith("sqlite"):
        database = make_url(url).database
        if database:
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False}, **kwargs
        )
        _configure_sqlite(engine)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 20)
    return create_engine(url, **kwargs)


def _configure_sqlite(engine: Engine) -> None:
    # pysqlite's own transaction handling cannot express BEGIN IMMEDIATE: switch it off and emit
    # BEGIN ourselves (the pattern SQLAlchemy's SQLite docs give for serializable transactions).
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        mode = conn.get_execution_options().get(SQLITE_BEGIN, "IMMEDIATE")
        conn.exec_driver_sql(f"BEGIN {mode}")


_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


def get_engine(url: str | None = None) -> Engine:
    """The process-wide engine for `url` (default: the settings' database_url)."""
    url = normalize_database_url(url or get_settings().database_url)
    with _engines_lock:
        if url not in _engines:
            _engines[url] = make_engine(url)
        return _engines[url]


def read_only_engine(engine: Engine) -> Engine:
    """The engine for connections that never write: on SQLite they do not take the write lock."""
    return engine.execution_options(**{SQLITE_BEGIN: "DEFERRED"}) if engine.dialect.name == "sqlite" else engine


def make_sessionmaker(engine: Engine, *, read_only: bool = False) -> sessionmaker[Session]:
    """Sessions that keep loaded values readable after commit (routes serialize after the service commits).

    `read_only=True`: for sessions that never write (see read_only_engine).
    """
    return sessionmaker(bind=read_only_engine(engine) if read_only else engine, expire_on_commit=False)


@contextmanager
def session_scope(bind: Engine | sessionmaker[Session] | None = None, *, read_only: bool = False) -> Iterator[Session]:
    """One session for one unit of work: commit on success, rollback on error, always close.

    Keep units short: on SQLite a writing session holds the database's write lock until it ends.
    `read_only=True` for units that only read (no write lock on SQLite).
    """
    if bind is None:
        bind = get_engine()
    factory = bind if isinstance(bind, sessionmaker) else make_sessionmaker(bind, read_only=read_only)
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def is_postgres(session_or_engine: Session | Engine) -> bool:
    bind = session_or_engine.get_bind() if isinstance(session_or_engine, Session) else session_or_engine
    return bind.dialect.name == "postgresql"


def alembic_config(url: str | None = None) -> Any:
    """An alembic Config pointing at the packaged migrations (no alembic.ini needed)."""
    from alembic.config import Config

    import migrations

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    cfg.attributes["url"] = normalize_database_url(url or get_settings().database_url)
    return cfg


def upgrade(url: str | None = None, revision: str = "head") -> None:
    """Bring the database at `url` to `revision` (default: the newest schema)."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def downgrade(url: str | None = None, revision: str = "base") -> None:
    """Take the database at `url` back to `revision` (default: empty)."""
    from alembic import command

    command.downgrade(alembic_config(url), revision)
