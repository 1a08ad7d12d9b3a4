"""`trainbox download`: a job's final model (its files) or one checkpoint (a streamed tar, unpacked
safely: no absolute paths, no `..`, no links out, no devices; only the checkpoint's own directory)."""

from __future__ import annotations

import io
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from client.cli_admin import human_bytes
from client.cli_common import (
    EXIT_FAILED,
    EXIT_NOT_FOUND,
    EXIT_USAGE,
    api_errors,
    console,
    err_console,
    fail,
    make_client,
    text,
)


class UnsafeArchive(tarfile.FilterError):
    """A member of a checkpoint archive outside the checkpoint's directory."""


class _Chunks(io.RawIOBase):
    """A readable file over an iterator of byte chunks (tarfile reads the stream as it arrives)."""

    def __init__(self, chunks: Iterator[bytes], on_read: Callable[[int], object]) -> None:
        self._chunks, self._buffer, self._on_read = chunks, b"", on_read

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buffer:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._buffer = chunk
            self._on_read(len(chunk))
        n = min(len(b), len(self._buffer))
        b[:n], self._buffer = self._buffer[:n], self._buffer[n:]
        return n


def extract_tar(
    chunks: Iterator[bytes], dest: Path, top: str, on_read: Callable[[int], object] = lambda n: None
) -> None:
    """Unpack a tar stream whose members all lie under `top/` into `dest/top` (which must not exist):
    into a temporary directory beside it first, so a broken download leaves nothing half-written."""

    def only_top(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo:
        parts = PurePosixPath(member.name).parts
        if not parts or parts[0] != top:
            raise UnsafeArchive(f"{member.name!r} is not under {top}/")
        return tarfile.data_filter(member, path)  # absolute paths, `..`, links out, devices: refused

    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{top}.", dir=dest))
    try:
        with tarfile.open(fileobj=io.BufferedReader(_Chunks(chunks, on_read)), mode="r|") as tar:
            tar.extractall(tmp, filter=only_top)
        if not (tmp / top).is_dir():
            raise UnsafeArchive(f"the archive holds no {top}/ directory")
        (tmp / top).rename(dest / top)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _checkpoint_name(value: str) -> str:
    """`step-500`, `500` or `checkpoints/step-500` -> `checkpoints/step-500`."""
    value = value.strip().removeprefix("checkpoints/")
    return f"checkpoints/{value if value.startswith('step-') else 'step-' + value}"


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=err_console,
        transient=True,
    )


def _print_listing(job_id: str, listing: dict[str, Any]) -> None:
    table = Table("artifact", "size", "download with")
    model = listing.get("model") or []
    if model:
        size = sum(int(f.get("size") or 0) for f in model)
        table.add_row("model (final)", f"{len(model)} files, {human_bytes(size)}", text(f"trainbox download {job_id}"))
    for c in listing.get("checkpoints") or []:
        step = str(c["name"]).split("/")[-1]
        table.add_row(
            text(c["name"]),
            human_bytes(int(c.get("size") or 0)),
            text(f"trainbox download {job_id} --checkpoint {step}"),
        )
    console.print(table)


def download(
    job_id: str = typer.Argument(..., help="the job"),
    checkpoint: str = typer.Option(
        None, "--checkpoint", "-c", help="a checkpoint (step-N, or N) instead of the final model", show_default=False
    ),
    out: Path = typer.Option(None, "--output", "-o", help="the folder to put it in", show_default="./<job id>"),
    list_only: bool = typer.Option(False, "--list", help="only list what can be downloaded"),
) -> None:
    """Download a job's final model (Hugging Face format) or one of its checkpoints."""
    out = out or Path(job_id)
    with api_errors():
        client = make_client()
        listing = client.artifacts(job_id)
        checkpoints = listing.get("checkpoints") or []
        have = ", ".join(str(c["name"]).split("/")[-1] for c in checkpoints) or "none"
        if list_only:
            _print_listing(job_id, listing)
            return
        if checkpoint:
            name = _checkpoint_name(checkpoint)
            entry = next((c for c in checkpoints if c["name"] == name), None)
            step = name.split("/")[-1]
            if entry is None:
                raise fail(f"job {job_id} has no checkpoint {step}; its checkpoints: {have}", EXIT_NOT_FOUND)
            if (out / step).exists():
                raise fail(f"{out / step} exists already: remove it, or choose another folder with -o", EXIT_USAGE)
            with _progress() as progress, client.download(job_id, name) as response:
                task = progress.add_task(step, total=int(response.headers.get("content-length") or 0) or None)
                try:
                    extract_tar(response.iter_bytes(), out, step, lambda n: progress.advance(task, n))
                except tarfile.TarError as exc:
                    raise fail(f"the download of {step} is not a complete, safe archive: {exc}", EXIT_FAILED) from None
            console.print(f"checkpoint {text(step)} ({human_bytes(int(entry.get('size') or 0))}) -> {text(out / step)}")
            return
        model = listing.get("model") or []
        if not model:
            raise fail(
                f"job {job_id} has no final model (yet); its checkpoints: {have} (download one with --checkpoint)",
                EXIT_NOT_FOUND,
            )
        root = out.resolve()
        with _progress() as progress:
            task = progress.add_task("model", total=sum(int(f.get("size") or 0) for f in model) or None)
            for f in model:
                dest = (root / str(f["name"])).resolve()
                if not dest.is_relative_to(root):  # the server's names are relative; anything else is refused
                    raise fail(f"refusing the artifact name {f['name']!r}: it leads outside {out}", EXIT_FAILED)
                dest.parent.mkdir(parents=True, exist_ok=True)
                part = dest.with_name(dest.name + ".part")
                with client.download(job_id, str(f["name"])) as response, part.open("wb") as fh:
                    for chunk in response.iter_bytes():
                        fh.write(chunk)
                        progress.advance(task, len(chunk))
                part.replace(dest)
    size = sum(int(f.get("size") or 0) for f in model)
    console.print(f"model: {len(model)} files ({human_bytes(size)}) -> {text(out / 'model')}")
