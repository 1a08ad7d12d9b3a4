"""Migration tests build their own databases (see tests/core/databases.py)."""
