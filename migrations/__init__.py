"""Alembic migrations: the only way trainbox's schema is created or changed.

Run them with `core.db.upgrade(url)` or `python -m migrations upgrade` (no alembic.ini needed).
"""
