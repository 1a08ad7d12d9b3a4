"""Client tests: the `trainbox` command run as a new user would (fresh directory, no settings)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def trainbox_argv() -> list[str]:
    """The installed console script, or `python -m client` in a checkout without it."""
    script = Path(sys.executable).parent / "trainbox"
    if script.exists():
        return [str(script)]
    found = shutil.which("trainbox")
    return [found] if found else [sys.executable, "-m", "client"]


@pytest.fixture
def user_env(tmp_path: Path) -> dict[str, str]:
    """The environment of someone who just cloned the repo: no TRAINBOX_ settings at all."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINBOX_")}
    # Except the box's DeepSpeed op cache (tests/conftest.py): building it again costs each stack a minute.
    env["TRAINBOX_TORCH_EXTENSIONS_DIR"] = os.environ["TRAINBOX_TORCH_EXTENSIONS_DIR"]
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["COLUMNS"] = "120"
    env["HOME"] = str(tmp_path / "home")
    return env


@pytest.fixture(autouse=True)
def _own_user_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test its own user config and state (`trainbox login`, the note of a running `trainbox up`):
    never the machine user's."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))
