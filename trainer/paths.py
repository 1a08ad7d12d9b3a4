"""Where a spec's model and dataset live, checked against the configured roots.

No torch here: the API runs these checks at submission so a bad path is a 422, not a failed job.
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from trainer.formats import Format, RecordError, check_record, resolve_format
from trainer.spec import DatasetRef, JobSpec, ValidationRef, check_relative_path

UPLOADS_DIR = "uploads"


class SpecError(ValueError):
    """A spec that cannot run here: a path outside its root, a missing file, unusable data."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class ModelSource:
    kind: Literal["preset", "local", "hub"]
    name: str  # the preset name, the local directory, or the hub id


@dataclass(frozen=True)
class DatasetInfo:
    path: Path
    format: Literal["jsonl", "text"]
    records: int
    bytes: int
    data_format: Format = "text"  # trainer.formats: text, prompt_completion or chat


def resolve_under(root: Path, rel: str, what: str) -> Path:
    """root/rel, refusing absolute paths, '..' and symlinks that lead outside root."""
    try:
        check_relative_path(rel, what)
    except ValueError as e:
        raise SpecError(str(e), what) from None
    try:
        real_root = root.resolve()
        path = (real_root / rel).resolve()
    except (OSError, RuntimeError) as e:
        # RuntimeError: a symlink loop (Python < 3.13 raises it from resolve()); OSError: ELOOP, a
        # name too long, a permission. Either way nothing usable is there.
        raise SpecError(f"{what} {rel!r} cannot be resolved under its root: {_reason(e)}", what) from None
    if not path.is_relative_to(real_root):
        raise SpecError(f"{what} {rel!r} leads outside its configured root", what)
    return path


def _reason(e: BaseException) -> str:
    if isinstance(e, RuntimeError) or getattr(e, "errno", None) == errno.ELOOP:
        return "a symlink loop"
    return getattr(e, "strerror", None) or type(e).__name__


def _is(kind: Literal["file", "dir"], path: Path, what: str, rel: str) -> bool:
    """path.is_file() / is_dir(), with the errors they do not swallow (a name too long, EACCES) as SpecError."""
    try:
        return path.is_file() if kind == "file" else path.is_dir()
    except OSError as e:
        raise SpecError(f"{what} {rel!r} cannot be read: {_reason(e)}", what) from None


def uploaded_dataset_path(data_root: Path, dataset_id: str) -> Path:
    """Where an uploaded dataset with this id is stored."""
    return data_root / UPLOADS_DIR / dataset_id


def resolve_dataset(ref: DatasetRef | ValidationRef, data_root: Path, what: str = "dataset") -> Path:
    """The dataset file a spec names; raises SpecError if it is not a readable file under the root."""
    if ref.id is not None:
        path = uploaded_dataset_path(data_root.resolve(), ref.id)
        if not path.is_file():
            prefix = "" if what == "dataset" else f"{what}: "
            raise SpecError(f"{prefix}no uploaded dataset with id {ref.id!r}", f"{what}.id")
        return path
    assert ref.path is not None
    path = resolve_under(data_root, ref.path, f"{what}.path")
    if path.is_relative_to(data_root.resolve() / UPLOADS_DIR):
        # Uploads belong to their uploader; the service checks that when a spec names one by id.
        msg = f"{what}.path may not lead into the uploads directory; name an upload by its id"
        raise SpecError(msg, f"{what}.path")
    if not _is("file", path, f"{what}.path", ref.path):
        raise SpecError(f"{what} file {ref.path!r} not found under the data root", f"{what}.path")
    return path


def resolve_model(model: str, model_root: Path) -> ModelSource:
    """Classify the spec's model: a preset, a directory under the model root, or a cached hub id."""
    if model.startswith("preset:"):
        return ModelSource("preset", model.removeprefix("preset:"))
    local = resolve_under(model_root, model, "model")
    if _is("dir", local, "model", model):
        if not _is("file", local / "config.json", "model", model):
            raise SpecError(f"model directory {model!r} has no config.json (save it with save_pretrained)", "model")
        return ModelSource("local", str(local))
    if model.count("/") == 1:
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.errors import HFValidationError
        from huggingface_hub.utils import validate_repo_id

        try:
            # The hub's own rules: the cache look-up would raise on an id it does not accept.
            validate_repo_id(model)
        except HFValidationError as e:
            raise SpecError(
                f"model {model!r} is neither a directory under the model root nor a valid Hugging Face hub id: {e}",
                "model",
            ) from None
        cached = try_to_load_from_cache(model, "config.json")
        if isinstance(cached, str):
            return ModelSource("hub", model)
        home = os.environ.get("HF_HOME", "~/.cache/huggingface")
        raise SpecError(
            f"model {model!r} is neither a directory under the model root nor in the local Hugging Face "
            f"cache ({home}); this box trains offline: on the box run `hf download {model}` "
            f"(same HF_HOME), or save the model under the model root and name that directory",
            "model",
        )
    raise SpecError(f"model directory {model!r} not found under the model root", "model")


def sniff_format(path: Path) -> Literal["jsonl", "text"]:
    with path.open("rb") as f:
        for raw in f:
            line = raw.strip()
            if line:
                return "jsonl" if line.startswith(b"{") else "text"
    return "text"


def inspect_dataset(
    path: Path, ref: DatasetRef | ValidationRef, max_records: int | None = None, *, what: str = "dataset"
) -> DatasetInfo:
    """Check that the file is usable data of its format; SpecError names the file and the line that is not."""
    try:
        return _inspect(path, ref, max_records, what)
    except OSError as e:
        raise SpecError(f"{what} cannot be read: {_reason(e)}", what) from None


def _inspect(path: Path, ref: DatasetRef | ValidationRef, max_records: int | None, what: str) -> DatasetInfo:
    fmt = sniff_format(path) if ref.format in ("auto", "text") else "jsonl"
    name = f"{what} {ref.path!r}" if ref.path is not None else f"{what} (upload {ref.id})"
    data_format: Format | None = None
    records = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if max_records is not None and records >= max_records:
                break
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise SpecError(f"{name} line {lineno} is not UTF-8 text", what) from None
            if not line:
                continue
            if fmt == "jsonl":
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SpecError(f"{name} line {lineno} is not valid JSON: {e.msg}", what) from None
                if data_format is None:
                    data_format = resolve_format(ref.format, obj, plain_text=False)
                try:
                    check_record(obj, data_format, ref.text_field)
                except RecordError as e:
                    field = f"{what}.text_field" if "text field" in str(e) else what
                    raise SpecError(f"{name} line {lineno} {e}", field) from None
            records += 1
    if records == 0:
        raise SpecError(f"{what} is empty: {name} has no non-blank lines", what)
    return DatasetInfo(
        path=path, format=fmt, records=records, bytes=path.stat().st_size, data_format=data_format or "text"
    )


def inspect_data(
    spec: JobSpec, data_root: Path, max_records: int | None = None
) -> tuple[DatasetInfo, DatasetInfo | None]:
    """The training data and the validation file (if any), checked; both must be of one format."""
    train = inspect_dataset(resolve_dataset(spec.dataset, data_root), spec.dataset, max_records)
    if spec.validation is None:
        return train, None
    ref = spec.validation
    val = inspect_dataset(resolve_dataset(ref, data_root, "validation"), ref, max_records, what="validation")
    check_same_format(train, val)
    return train, val


def check_same_format(train: DatasetInfo, val: DatasetInfo) -> None:
    """SpecError unless the validation data is of the training data's format (one masking, one template)."""
    if val.data_format != train.data_format:
        raise SpecError(
            f"validation data is {val.data_format} but the training data is {train.data_format}: "
            f"both must be of one format",
            "validation",
        )
