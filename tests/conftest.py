"""Every test process, worker and rank shares one DeepSpeed op cache: the one scripts/setup.sh builds
for the checkout's default data dir. Without it each test stack's worker would compile the ops again
(about a minute on a small CPU box). Tests that need a cache of their own set these themselves."""

from __future__ import annotations

import os
from pathlib import Path

SHARED_EXTENSIONS_DIR = Path(__file__).resolve().parents[1] / ".trainbox" / "torch_extensions"

os.environ.setdefault("TRAINBOX_TORCH_EXTENSIONS_DIR", str(SHARED_EXTENSIONS_DIR))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.environ["TRAINBOX_TORCH_EXTENSIONS_DIR"])
