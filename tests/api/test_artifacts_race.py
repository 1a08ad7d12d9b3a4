"""GET /jobs/{id} lists the run's artifacts while the trainer saves and prunes checkpoints: a checkpoint
deleted during the listing is left out, never a 500 (seen as a flaky 500 in the embedded stack)."""

from __future__ import annotations

import shutil
import threading
import time

from api.artifacts import list_artifacts


def test_listing_survives_checkpoints_pruned_under_it(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    stop = threading.Event()

    def trainer() -> None:
        # What trainer/checkpoint.save does with keep=1: write a step, then delete the older one.
        step = 0
        while not stop.is_set():
            step += 1
            d = root / f"step-{step}"
            d.mkdir()
            for i in range(20):
                (d / f"shard-{i}.pt").write_bytes(b"x" * 64)
            shutil.rmtree(root / f"step-{step - 1}", ignore_errors=True)

    t = threading.Thread(target=trainer, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 1.5  # the unfixed listing failed within 0.2 s
        while time.monotonic() < deadline:
            listed = list_artifacts(tmp_path)
            assert all(c["name"].startswith("checkpoints/step-") for c in listed["checkpoints"])
    finally:
        stop.set()
        t.join(10)
