"""Roots: models and datasets resolve only inside their configured directories."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.paths import SpecError, resolve_dataset, resolve_model, uploaded_dataset_path
from trainer.spec import DatasetRef


def test_dataset_under_root_resolves(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.jsonl").write_text('{"text": "x"}\n')
    assert resolve_dataset(DatasetRef(path="sub/a.jsonl"), tmp_path) == (tmp_path / "sub" / "a.jsonl").resolve()


def test_missing_dataset_is_named(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="dataset file 'nope.jsonl' not found under the data root"):
        resolve_dataset(DatasetRef(path="nope.jsonl"), tmp_path)


def test_symlink_out_of_the_root_is_refused(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_text("secret\n")
    (root / "link.txt").symlink_to(outside / "secret.txt")
    (root / "dirlink").symlink_to(outside)
    with pytest.raises(SpecError, match="leads outside its configured root"):
        resolve_dataset(DatasetRef(path="link.txt"), root)
    with pytest.raises(SpecError, match="leads outside its configured root"):
        resolve_dataset(DatasetRef(path="dirlink/secret.txt"), root)
    with pytest.raises(SpecError, match="leads outside"):
        resolve_model("dirlink", root)


def test_uploaded_dataset_by_id(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="no uploaded dataset with id 'abc'"):
        resolve_dataset(DatasetRef(id="abc"), tmp_path)
    path = uploaded_dataset_path(tmp_path, "abc")
    path.parent.mkdir()
    path.write_text("hello\n")
    assert resolve_dataset(DatasetRef(id="abc"), tmp_path) == path.resolve()


def test_model_kinds(tmp_path: Path) -> None:
    assert resolve_model("preset:tiny", tmp_path).kind == "preset"
    (tmp_path / "mine").mkdir()
    with pytest.raises(SpecError, match="has no config.json"):
        resolve_model("mine", tmp_path)
    (tmp_path / "mine" / "config.json").write_text("{}")
    assert resolve_model("mine", tmp_path).kind == "local"


def test_hub_id_not_in_cache_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(SpecError) as e:
        resolve_model("deepseek-ai/deepseek-coder-1.3b-base", tmp_path)
    assert "not in the local Hugging Face cache" in str(e.value) or "nor in the local Hugging Face" in str(e.value)
    assert "hf download deepseek-ai/deepseek-coder-1.3b-base" in str(e.value)


def test_symlink_loop_is_a_spec_error(tmp_path: Path) -> None:
    """resolve() raised RuntimeError("Symlink loop"): a 500 at submission."""
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(SpecError, match="symlink loop") as e:
        resolve_dataset(DatasetRef(path="a"), tmp_path)
    assert e.value.field == "dataset.path"
    with pytest.raises(SpecError, match="symlink loop"):
        resolve_model("b", tmp_path)


def test_name_too_long_is_a_spec_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="dataset.path"):
        resolve_dataset(DatasetRef(path="x" * 300 + "/a.jsonl"), tmp_path)


@pytest.mark.parametrize("model", ["foo/bar baz", "foo/-bar", "a/b--c", "foo/bar.", "foo/x.git", "foo/" + "x" * 97])
def test_ids_the_hub_rejects_are_spec_errors(tmp_path: Path, model: str) -> None:
    """huggingface_hub raised HFValidationError from the cache look-up: a 500 at submission."""
    with pytest.raises(SpecError, match="nor a valid Hugging Face hub id") as e:
        resolve_model(model, tmp_path)
    assert e.value.field == "model"
