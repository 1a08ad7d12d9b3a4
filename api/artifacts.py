"""A job's files under its run directory: the final model, checkpoints, the training log.

What /artifacts lists is what can be downloaded: each file of the model and of every checkpoint,
and each checkpoint directory as one uncompressed tar (safetensors and torch shards do not
compress), streamed. Symlinks are neither listed, nor archived, nor followed out of the run dir.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tarfile
import weakref
from collections.abc import Iterator
from pathlib import Path

from api.errors import NotFound
from trainer.events import CHECKPOINTS_DIR, MODEL_DIR

DOWNLOADABLE = (MODEL_DIR, CHECKPOINTS_DIR)
_STEP = re.compile(r"^step-(\d+)$")
CHUNK = 1 << 20


def _real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def files_under(root: Path) -> list[Path]:
    """The regular files under root, sorted; symlinks (to files or directories) are skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):  # os.walk does not descend into linked dirs
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath, name)
            if p.is_file() and not p.is_symlink():
                found.append(p)
    return sorted(found)


def list_artifacts(run_dir: Path) -> dict[str, list[dict[str, object]]]:
    """{"model": [{name, size}], "checkpoints": [{name, step, size, files}]}, names relative to the run dir."""

    def entry(p: Path) -> dict[str, object] | None:
        try:
            return {"name": p.relative_to(run_dir).as_posix(), "size": p.stat().st_size}
        except FileNotFoundError:
            return None  # the trainer pruned it while we listed (old checkpoints go as new ones land)

    model_dir = run_dir / MODEL_DIR
    model = [e for p in files_under(model_dir) if (e := entry(p))] if _real_dir(model_dir) else []
    checkpoints = []
    ckpt_dir = run_dir / CHECKPOINTS_DIR
    if _real_dir(ckpt_dir):
        for p in ckpt_dir.iterdir():
            m = _STEP.match(p.name)
            if m and _real_dir(p):
                listed = [entry(f) for f in files_under(p)]
                files = [e for e in listed if e is not None]
                if len(files) < len(listed) or not p.is_dir():
                    continue  # pruned while we listed it
                size = sum(int(f["size"]) for f in files)  # type: ignore[call-overload]
                name = f"{CHECKPOINTS_DIR}/{p.name}"
                checkpoints.append({"name": name, "step": int(m.group(1)), "size": size, "files": files})
    checkpoints.sort(key=lambda c: c["step"])  # type: ignore[arg-type, return-value]
    return {"model": model, "checkpoints": checkpoints}


def checkpoint_dir(run_dir: Path, name: str) -> Path | None:
    """The checkpoint directory `name` names (`checkpoints/step-N`, as listed), or None."""
    parts = name.split("/")
    if len(parts) != 2 or parts[0] != CHECKPOINTS_DIR or not _STEP.match(parts[1]):
        return None
    path = run_dir / name
    if not _real_dir(run_dir / CHECKPOINTS_DIR) or not _real_dir(path):
        return None
    return path


class TarStream:
    """A directory as an uncompressed tar, streamed in 1 MiB chunks; its length is known up front.

    Every file is opened (O_NOFOLLOW) before the first byte goes out, so a checkpoint that the
    trainer prunes while it downloads still arrives whole; FileNotFoundError if it was pruned before
    all were open. A file that shrinks meanwhile (it should
    not: checkpoints are sealed) ends the stream early, which the client sees as a short body.
    """

    def __init__(self, directory: Path) -> None:
        self.entries: list[tuple[bytes, int | None, int]] = []  # (header, fd, size)
        self._fds: list[int] = []
        weakref.finalize(self, _close_all, self._fds)

        def fail(error: OSError) -> None:
            raise error

        try:
            self._add_dir(directory, directory.name)
            for dirpath, dirnames, filenames in os.walk(directory, onerror=fail):
                dirnames.sort()
                rel = Path(dirpath).relative_to(directory.parent).as_posix()
                for d in list(dirnames):
                    if Path(dirpath, d).is_symlink():
                        dirnames.remove(d)
                    else:
                        self._add_dir(Path(dirpath, d), f"{rel}/{d}")
                for f in sorted(filenames):
                    self._add_file(Path(dirpath, f), f"{rel}/{f}")
            if not directory.is_dir():
                raise FileNotFoundError(directory)  # pruned while its files were opened: no partial archive
        except BaseException:
            self.close()
            raise
        members = sum(len(h) + size + _pad(size) for h, _, size in self.entries)
        end = 2 * tarfile.BLOCKSIZE  # two zero blocks, then zeros to a whole record, as tarfile writes
        self.trailer = bytes(end + (-(members + end)) % tarfile.RECORDSIZE)
        self.length = members + len(self.trailer)

    def _add_dir(self, path: Path, arcname: str) -> None:
        info = tarfile.TarInfo(arcname)
        info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, int(path.stat().st_mtime)
        self.entries.append((_header(info), None, 0))

    def _add_file(self, path: Path, arcname: str) -> None:
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                return  # a symlink, a FIFO, ...: not listed, not archived
            # O_NOFOLLOW: swapped for a link since the lstat, it is refused; O_NONBLOCK: a FIFO never hangs us.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return
        self._fds.append(fd)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return
        info = tarfile.TarInfo(arcname)
        info.size, info.mode, info.mtime = st.st_size, 0o644, int(st.st_mtime)
        self.entries.append((_header(info), fd, st.st_size))

    def __iter__(self) -> Iterator[bytes]:
        try:
            for header, fd, size in self.entries:
                yield header
                if fd is None:
                    continue
                left = size
                while left:
                    chunk = os.read(fd, min(CHUNK, left))
                    if not chunk:
                        raise OSError(f"a file shrank while its archive was streamed ({left} bytes short)")
                    left -= len(chunk)
                    yield chunk
                if _pad(size):
                    yield bytes(_pad(size))
            yield self.trailer
        finally:
            self.close()

    def close(self) -> None:
        _close_all(self._fds)


def _header(info: tarfile.TarInfo) -> bytes:
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _pad(size: int) -> int:
    return (-size) % tarfile.BLOCKSIZE


def _close_all(fds: list[int]) -> None:
    while fds:
        with contextlib.suppress(OSError):
            os.close(fds.pop())


def artifact_path(run_dir: Path, name: str) -> Path:
    """The file `name` under the run dir's model/ or checkpoints/; 404 for anything else (no traversal)."""
    parts = name.replace("\\", "/").split("/")
    if not name or name.startswith("/") or ".." in parts or "\x00" in name or parts[0] not in DOWNLOADABLE:
        raise NotFound(f"no artifact named {name!r}", ["path", "name"])
    root = run_dir.resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root / parts[0]) or not path.is_file():
        raise NotFound(f"no artifact named {name!r}", ["path", "name"])
    return path


def tail_lines(path: Path, n: int, block: int = 64 * 1024) -> list[str]:
    """The last n (>= 1) lines of a text file, reading from the end (logs can be large)."""
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        end = f.tell()
        data = b""
        while end > 0 and data.count(b"\n") <= n:
            start = max(0, end - block)
            f.seek(start)
            data = f.read(end - start) + data
            end = start
    return data.decode("utf-8", "replace").splitlines()[-n:]
