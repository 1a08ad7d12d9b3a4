"""The DeepSpeed op cache the worker owns: built before any job, a killed builder's lock removed, a live
builder's lock named when it is in the way. Real builds and loads (DS_ACCELERATOR=cpu), no mocks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import SHARED_EXTENSIONS_DIR
from tests.helpers import lock_holder
from worker.ops import OpsError, prepare_box_ops, prepare_ops, remove_stale_locks
from worker.supervisor import child_env

SHM_OP = "deepspeed_shm_comm"  # what every CPU rank loads in deepspeed.init_distributed


@pytest.fixture(scope="module")
def built_cache() -> Path:
    """The shared cache with the CPU ops built (setup.sh normally did it; the first time this builds)."""
    prepare_ops(accelerator="cpu", root=SHARED_EXTENSIONS_DIR, timeout_s=900, env=child_env("cpu", []))
    assert (SHARED_EXTENSIONS_DIR / SHM_OP / f"{SHM_OP}.so").is_file()
    return SHARED_EXTENSIONS_DIR


@pytest.fixture
def cache(built_cache: Path, tmp_path: Path) -> Path:
    """A private copy of the built cache (mtimes kept, so nothing is compiled again)."""
    root = tmp_path / "ext"
    shutil.copytree(built_cache, root, symlinks=True)
    for lock in root.glob("*/lock"):
        lock.unlink()
    return root


def _rank_loads_the_op(root: Path, timeout: float) -> float:
    """What a CPU rank does in init_distributed: load the shm comm op from the cache; returns seconds."""
    env = child_env("cpu", [], extensions_dir=root)
    began = time.monotonic()
    subprocess.run(
        [sys.executable, "-c", "from deepspeed.comm.torch import build_shm_op; assert build_shm_op() is not None"],
        env=env,
        check=True,
        timeout=timeout,
        capture_output=True,
    )
    return time.monotonic() - began


def test_worker_start_removes_a_killed_builders_lock_and_ranks_load_without_waiting(cache, caplog):
    lock = cache / SHM_OP / "lock"
    lock.touch()  # a rank SIGKILLed inside the build left it: before, every later rank waited forever
    with caplog.at_level("INFO", logger="worker.ops"):
        seconds = prepare_ops(accelerator="cpu", root=cache, timeout_s=300, env=child_env("cpu", []))
    assert not lock.exists()
    assert f"removed a stale DeepSpeed build lock {lock}" in caplog.text
    assert f"DeepSpeed ops: {SHM_OP}: ready in" in caplog.text and "DeepSpeed ops ready in" in caplog.text
    assert seconds < 120, "built already: only loaded"
    assert _rank_loads_the_op(cache, timeout=120) < 120


def test_a_live_builders_lock_is_kept_and_a_build_stuck_behind_it_fails_the_start_naming_it(cache):
    lock = cache / SHM_OP / "lock"
    with lock_holder(lock) as holder:
        assert remove_stale_locks(cache) == [] and lock.exists()
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        with pytest.raises(OpsError) as e:
            prepare_ops(accelerator="cpu", root=cache, timeout_s=8, env=child_env("cpu", []))
        assert "did not finish within 8s" in str(e.value)
        assert f"{lock} (held by pid {holder.pid})" in str(e.value)
        left = {p.pid for p in psutil.Process().children(recursive=True)} - before
        assert left == set(), "the stuck build is killed"


def test_the_worker_points_itself_and_its_ranks_at_the_cache_from_the_settings(cache, monkeypatch):
    from core.settings import get_settings

    monkeypatch.setenv("TRAINBOX_TORCH_EXTENSIONS_DIR", str(cache))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", os.environ.get("TORCH_EXTENSIONS_DIR", ""))  # restored after
    get_settings.cache_clear()
    try:
        prepare_box_ops("cpu")
        assert os.environ["TORCH_EXTENSIONS_DIR"] == str(cache)
    finally:
        get_settings.cache_clear()


def test_a_worker_killed_mid_build_takes_its_builder_along(cache, tmp_path):
    """The worker dies (SIGKILL) while its op build waits behind another builder's lock: the build
    process does not live on as an orphan (it would hold the cache's next lock and a CPU)."""
    lock = cache / SHM_OP / "lock"
    fd = os.open(lock, os.O_CREAT | os.O_EXCL)  # a build that never ends holds it
    worker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from worker.ops import prepare_ops; "
            "from worker.supervisor import child_env; "
            "prepare_ops(accelerator='cpu', root=Path(sys.argv[1]), timeout_s=600, env=child_env('cpu', []))",
            str(cache),
        ]
    )
    try:
        from tests.helpers import wait_for

        builder = wait_for(
            lambda: next((c for c in psutil.Process(worker.pid).children() if "trainer.ops" in c.cmdline()), None),
            timeout=60,
            what="the op build started",
        )
        worker.kill()
        worker.wait()
        gone, alive = psutil.wait_procs([builder], timeout=10)
        assert alive == [], "the builder outlived its worker"
    finally:
        os.close(fd)
        if worker.poll() is None:
            worker.kill()


def test_ranks_and_op_builds_find_the_ninja_beside_the_workers_interpreter():
    """A stack started without activating its venv (PATH without it): the ranks still build with the venv's
    ninja, not the system's (two ninjas rebuild each other's op cache) or none."""
    env = child_env("cpu", [], base={"PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    beside = Path(sys.executable).parent / "ninja"
    assert beside.exists(), "the venv installs ninja (DeepSpeed's op builds need it)"
    assert shutil.which("ninja", path=env["PATH"]) == str(beside)
