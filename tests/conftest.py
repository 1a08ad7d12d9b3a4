"""Every test process, worker and rank shares one DeepSpeed op cache: the one scripts/setup.sh builds
for the checkout's default data dir. Without it each test stack's worker would compile the ops again
(about a minute on a small CPU box). Tests that need a cache of their own set these themselves."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

SHARED_EXTENSIONS_DIR = Path(__file__).resolve().parents[1] / ".trainbox" / "torch_extensions"

os.environ.setdefault("TRAINBOX_TORCH_EXTENSIONS_DIR", str(SHARED_EXTENSIONS_DIR))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.environ["TRAINBOX_TORCH_EXTENSIONS_DIR"])


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Settings of an embedded stack in tmp_path (its SQLite, no Redis), none from the environment."""
    from core.settings import get_settings

    for key in ("TRAINBOX_URL", "TRAINBOX_TOKEN", "TRAINBOX_DATABASE_URL", "TRAINBOX_REDIS_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("TRAINBOX_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "200")
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


# The venv's programs first, as scripts/test.sh has them (it activates the venv), also for a run of the
# venv's python without activation: its ninja is the one that built the shared op cache. The system's
# ninja (another version) hashes build commands differently and would compile the ops again, and the
# next build with the venv's ninja once more.
_VENV_BIN = str(Path(sys.executable).parent)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _VENV_BIN:
    os.environ["PATH"] = os.pathsep.join(p for p in (_VENV_BIN, os.environ.get("PATH", "")) if p)
