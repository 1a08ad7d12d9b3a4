"""The tokenized-data cache: `<data root>/.cache/tokens/data-<key>.*`, shared by every job on the same
data (trainer.data.prepare builds and reads entries). An entry is complete once its stats file
(`data-<key>.json`) exists; that file's mtime is the entry's last use. Bounded by size (least recently
used entries go first) and, through `trainbox prune`, by age."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

TOKEN_CACHE_DIR = ".cache/tokens"  # under the data root
DEFAULT_TOKEN_CACHE_BYTES = 50 * 10**9
STALE_TMP_S = 86400  # a temp file this old belongs to a build that died
IN_USE_S = 600  # an entry used this recently may be about to be opened by another job's ranks: kept


def location(data_root: Path, run_dir: Path, limit: int) -> tuple[Path, int | None]:
    """Where a job caches its tokenized data, and the bound: under the data root, shared by jobs
    (`limit` bytes); in its run dir, unbounded, when the data root is not writable or `limit` is 0."""
    shared = data_root / TOKEN_CACHE_DIR
    try:
        if limit <= 0:
            raise PermissionError("the shared token cache is off")
        shared.mkdir(parents=True, exist_ok=True)
        if not os.access(shared, os.W_OK):
            raise PermissionError(str(shared))
    except OSError:
        return run_dir / "data", None
    return shared, limit


@dataclass
class Entry:
    key: str
    files: list[Path]
    used: float  # Unix time of its last use (0: incomplete, no stats file)
    bytes: int


def entries(cache_dir: Path, *, now: float | None = None) -> list[Entry]:
    """The cache's entries, least recently used first; temp files of builds that died are deleted."""
    now = time.time() if now is None else now
    grouped: dict[str, list[Path]] = {}
    for f in cache_dir.iterdir() if cache_dir.is_dir() else []:
        if not f.name.startswith("data-"):
            continue
        if ".tmp" in f.name:
            with contextlib.suppress(OSError):
                if now - f.stat().st_mtime > STALE_TMP_S:
                    f.unlink()
            continue
        grouped.setdefault(f.name.removeprefix("data-").split(".")[0], []).append(f)
    out = []
    for key, files in grouped.items():
        stats = cache_dir / f"data-{key}.json"
        with contextlib.suppress(OSError):
            used = stats.stat().st_mtime if stats.exists() else 0.0
            out.append(Entry(key, files, used, sum(f.stat().st_size for f in files)))
    return sorted(out, key=lambda e: e.used)


def _delete(entry: Entry) -> None:
    for f in sorted(entry.files, key=lambda f: not f.name.endswith(".json")):  # stats first: incomplete
        f.unlink(missing_ok=True)


def evict(cache_dir: Path, max_bytes: int, keep: str) -> list[str]:
    """Delete the least recently used entries until the cache holds at most max_bytes (never `keep`,
    the entry just used, nor one used in the last IN_USE_S); returns the keys deleted. A job still
    reading a deleted entry keeps its open memory maps."""
    now = time.time()
    found = entries(cache_dir, now=now)
    total = sum(e.bytes for e in found)
    deleted = []
    for entry in found:
        if total <= max_bytes:
            break
        if entry.key == keep or now - entry.used < IN_USE_S:
            continue
        total -= entry.bytes
        _delete(entry)
        deleted.append(entry.key)
    return deleted


def prune_unused(cache_dir: Path, older_than_s: float, *, dry_run: bool = False) -> list[Entry]:
    """Delete the entries not used for `older_than_s` (never one used in the last IN_USE_S); returns them."""
    now = time.time()
    old = [e for e in entries(cache_dir, now=now) if now - e.used >= max(older_than_s, IN_USE_S)]
    if not dry_run:
        for entry in old:
            _delete(entry)
    return old
