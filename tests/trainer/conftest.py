"""Fixtures for the trainer: a small repetitive corpus, specs, and real multi-rank launches."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
WORDS = "the quick brown fox jumps over the lazy dog and then runs back home to sleep".split()  # noqa: SIM905


def write_corpus(path: Path, lines: int = 400) -> Path:
    """Rotations of one sentence: easy to learn, so a falling loss is a clear signal on CPU."""
    with path.open("w") as f:
        for i in range(lines):
            f.write(json.dumps({"text": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(30))}) + "\n")
    return path


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_corpus(root / "corpus.jsonl")
    return root


def tiny_spec(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "tiny",
        "model": "preset:tiny",
        "dataset": {"path": "corpus.jsonl"},
        "gpus": 2,
        "seq_len": 64,
        "max_steps": 30,
        "checkpoint_every": 10,
        "deepspeed": {
            "train_batch_size": 8,
            "gradient_accumulation_steps": 2,
            "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01}},
            "zero_optimization": {"stage": 2},
        },
    }
    for key, value in overrides.items():
        if key == "deepspeed":
            spec["deepspeed"] = {**spec["deepspeed"], **value}
        else:
            spec[key] = value
    return spec


def trainer_cmd(spec_file: Path, run_dir: Path, data_root: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "trainer",
        "run",
        "--spec",
        str(spec_file),
        "--run-dir",
        str(run_dir),
        "--data-root",
        str(data_root),
        "--model-root",
        str(data_root),
        *extra,
    ]


def start_trainer(
    spec: dict[str, Any],
    run_dir: Path,
    data_root: Path,
    extra_env: dict[str, str] | None = None,
    extra_args: tuple[str, ...] = (),
) -> subprocess.Popen[bytes]:
    """Launch the trainer in its own session, as the worker does (`extra_env`: more variables,
    `extra_args`: more launcher options)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_file = run_dir / "spec.json"
    spec_file.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"} | {"CUDA_VISIBLE_DEVICES": ""}
    env |= extra_env or {}
    return subprocess.Popen(
        trainer_cmd(spec_file, run_dir, data_root, *extra_args),
        cwd=REPO,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def events(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_losses(evs: list[dict[str, Any]]) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in evs if e["type"] == "step"}


@pytest.fixture
def run_trainer(data_root: Path) -> Callable[..., tuple[int, Path]]:
    """Run a spec to completion; returns (exit code, run dir)."""
    procs: list[subprocess.Popen[bytes]] = []

    def run(spec: dict[str, Any], run_dir: Path, timeout: float = 300) -> tuple[int, Path]:
        p = start_trainer(spec, run_dir, data_root)
        procs.append(p)
        return p.wait(timeout=timeout), run_dir

    yield run
    for p in procs:  # never leave ranks behind, even when an assertion failed mid-test
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


@pytest.fixture(scope="module")
def reference_run(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted 30-step run: the baseline that interrupted runs must reproduce."""
    run_dir = tmp_path_factory.mktemp("reference")
    p = start_trainer(tiny_spec(), run_dir, data_root)
    assert p.wait(timeout=300) == 0, (run_dir / "train.log").read_text()[-3000:]
    return run_dir


class PortSquatter:
    """Another program on the shared box: holds 29500 and its neighbours, and binds each rendezvous port
    a launcher hands its ranks (their MASTER_PORT) the moment a rank process shows it, before any rank
    could bind it itself. `ports`: MASTER_PORT -> whether it was already held when the squatter tried."""

    def __init__(self, marker: str, static: Iterable[int] = range(29500, 29511)) -> None:
        import threading

        self.marker = marker
        self.sockets = [s for s in (self._bind(p) for p in static) if s is not None]
        self.ports: dict[int, bool] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _bind(port: int) -> Any:
        import socket

        s = socket.socket()
        try:
            s.bind(("0.0.0.0", port))
            s.listen()
        except OSError:
            s.close()
            return None  # someone holds it already: as good for the test
        return s

    def _run(self) -> None:
        import time

        import psutil

        while not self._stop.is_set():
            for p in psutil.process_iter(["cmdline"]):
                cmd = p.info["cmdline"] or []
                if "rank" not in cmd or self.marker not in " ".join(cmd):
                    continue
                try:
                    port = int(p.environ()["MASTER_PORT"])
                except (psutil.Error, KeyError, ValueError):
                    continue
                if port not in self.ports:
                    s = self._bind(port)
                    self.ports[port] = s is None
                    if s is not None:
                        self.sockets.append(s)
            time.sleep(0.01)

    def __enter__(self) -> PortSquatter:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        for s in self.sockets:
            s.close()
