"""Disk on a shared box, with real 2-rank DeepSpeed runs on a small real filesystem (a tmpfs):
a checkpoint that does not fit fails the run with error type `disk` before anything is written, a
write that runs out of space anyway leaves no partial checkpoint, and the newest complete checkpoint
stays the newest and loads. The estimate is never below what DeepSpeed really writes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers import resize_filesystem, small_filesystem
from tests.trainer.conftest import events, start_trainer, tiny_spec
from tests.trainer.test_train import no_process_left
from trainer.checkpoint import estimate_bytes

pytestmark = pytest.mark.slow


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def leftovers(run_dir: Path) -> list[str]:
    """Partial saves: temp checkpoint directories, a final model cut short."""
    ckpts = run_dir / "checkpoints"
    found = [p.name for p in ckpts.iterdir() if p.name.startswith(".tmp")] if ckpts.is_dir() else []
    return found + ([".tmp-model"] if (run_dir / ".tmp-model").exists() else [])


def steps_saved(run_dir: Path) -> list[str]:
    ckpts = run_dir / "checkpoints"
    return sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step-")) if ckpts.is_dir() else []


def failed_end(run_dir: Path) -> dict:
    end = events(run_dir)[-1]
    assert end["type"] == "end" and end["status"] == "failed", end
    return end["error"]


def test_a_checkpoint_that_does_not_fit_fails_as_disk_before_writing_anything(data_root: Path, tmp_path: Path):
    with small_filesystem(tmp_path / "fs", "8m") as fs:
        run_dir = fs / "run"
        p = start_trainer(tiny_spec(max_steps=4, checkpoint_every=2), run_dir, data_root)
        assert p.wait(timeout=300) == 1, (run_dir / "train.log").read_text()[-3000:]
        error = failed_end(run_dir)
        assert error["type"] == "disk" and error["exit_code"] == 1
        msg = error["message"]
        assert "not enough disk space for checkpoint step-2" in msg, msg
        assert f"free on the filesystem of {run_dir / 'checkpoints'}" in msg
        needed, free = (int(x) for x in re.findall(r"\((\d+) bytes", msg))
        assert needed == events(run_dir)[0]["checkpoint_estimate_bytes"] and free < needed
        assert "trainbox prune" in msg
        assert steps_saved(run_dir) == [] and leftovers(run_dir) == []
        assert [e["step"] for e in events(run_dir) if e["type"] == "step"] == [1, 2]  # stopped at the first save
        assert no_process_left(run_dir)


def test_the_newest_complete_checkpoint_survives_a_full_disk_and_resumes(data_root: Path, tmp_path: Path):
    spec = tiny_spec(max_steps=6, checkpoint_every=2)  # ZeRO-2, fp32: the largest checkpoint per parameter
    with small_filesystem(tmp_path / "fs", "20m") as fs:
        run_dir = fs / "run"
        p = start_trainer(spec, run_dir, data_root)
        assert p.wait(timeout=300) == 1, (run_dir / "train.log").read_text()[-3000:]
        error = failed_end(run_dir)
        assert error["type"] == "disk" and "checkpoint step-4" in error["message"], error
        assert steps_saved(run_dir) == ["step-2"] and leftovers(run_dir) == []
        assert no_process_left(run_dir)

        start = events(run_dir)[0]
        real = checkpoint_bytes(run_dir / "checkpoints" / "step-2")
        assert start["checkpoint_estimate_bytes"] == estimate_bytes(start["n_params"], "fp32", 2, 2)
        assert real <= start["checkpoint_estimate_bytes"], (real, start["checkpoint_estimate_bytes"])

        resize_filesystem(fs, "48m")  # an admin freed space: the same run dir resumes from step-2
        p = start_trainer(spec, run_dir, data_root)
        assert p.wait(timeout=300) == 0, (run_dir / "train.log").read_text()[-3000:]
        starts = [e for e in events(run_dir) if e["type"] == "start"]
        assert starts[-1]["resumed_from_step"] == 2
        assert events(run_dir)[-1]["status"] == "succeeded" and steps_saved(run_dir) == ["step-4", "step-6"]


def test_a_write_that_runs_out_of_space_removes_its_partial_checkpoint(data_root: Path, tmp_path: Path):
    """The free-space check passed (here: switched off) but the disk filled during the write."""
    with small_filesystem(tmp_path / "fs", "16m") as fs:  # step-2 (10 MB) fits, step-4 does not
        run_dir = fs / "run"
        p = start_trainer(
            tiny_spec(max_steps=6, checkpoint_every=2), run_dir, data_root, extra_env={"TRAINBOX_DISK_CHECK": "off"}
        )
        assert p.wait(timeout=300) == 1, (run_dir / "train.log").read_text()[-3000:]
        error = failed_end(run_dir)
        assert error["type"] == "disk", error
        assert "checkpoint step-4 could not be written" in error["message"], error["message"]
        assert "the filesystem is full" in error["message"] and "the partial checkpoint was removed" in error["message"]
        assert not (run_dir / "errors").is_dir() or not list((run_dir / "errors").glob(".*"))  # reserves returned
        # Complete, and still the newest: resume would load it.
        assert steps_saved(run_dir) == ["step-2"] and (run_dir / "checkpoints" / "step-2" / "trainbox.json").is_file()
        assert leftovers(run_dir) == []
        assert no_process_left(run_dir)
