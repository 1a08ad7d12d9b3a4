"""Fixtures for core tests: a migrated database per backend (SQLite file, fresh Postgres database)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from core.db import make_engine, make_sessionmaker, upgrade
from tests.core.databases import BACKENDS, clear_tables, fresh_database


@pytest.fixture(scope="session", params=BACKENDS)
def engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    with fresh_database(request.param, tmp_path_factory.mktemp("db")) as url:
        upgrade(url)
        eng = make_engine(url)
        yield eng
        eng.dispose()


@pytest.fixture
def sessions(engine: Engine) -> Iterator[object]:
    yield make_sessionmaker(engine)
    clear_tables(engine)


@pytest.fixture
def session(sessions) -> Iterator[Session]:  # type: ignore[no-untyped-def]
    with sessions() as s:
        yield s
