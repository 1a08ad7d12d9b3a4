"""Start-up time of the hand-written launcher (before torch's elastic agent) vs the elastic one.

    python benchmarks/launch.py                 # 2 CPU ranks, 5 alternating repeats
    python benchmarks/launch.py --gpus 1        # on a GPU box: ranks on CUDA

Both launchers run the same spec (preset:tiny, one step, nothing saved) with the same rank program;
only the launcher differs. The old one is trainer/launch.py as of OLD_LAUNCHER_REV, read from git.
Runs alternate (old, new, new, old, ...) so drift on a shared machine hits both alike. Reported per
launcher, median and min over the repeats:
- ranks up: launch -> the last rank process exists (what the launcher itself costs);
- start: launch -> the `start` event, which rank 0 writes once every rank has joined the process
  group and built its DeepSpeed engine (every rank through start-up);
- rank start-up: the difference, the ranks' own part (the same program under both launchers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OLD_LAUNCHER_REV = "1958e57"  # the last commit whose trainer/launch.py started the ranks itself

RUN_OLD = """
import argparse, importlib.util, sys
spec = importlib.util.spec_from_file_location("old_launch", sys.argv[1])
old = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old)
args = argparse.Namespace(spec=sys.argv[2], run_dir=sys.argv[3], model_root=sys.argv[4], data_root=sys.argv[4],
                          master_port=0, no_save=True)
sys.exit(old.Launcher(args).run())
"""


def write_corpus(path: Path) -> None:
    words = "the quick brown fox jumps over the lazy dog and then runs back home to sleep".split()  # noqa: SIM905
    with path.open("w") as f:
        for i in range(400):
            f.write(json.dumps({"text": " ".join(words[(i + j) % len(words)] for j in range(30))}) + "\n")


def spec(gpus: int) -> dict[str, Any]:
    return {
        "name": "launch-bench",
        "model": "preset:tiny",
        "dataset": {"path": "corpus.jsonl"},
        "gpus": gpus,
        "seq_len": 64,
        "max_steps": 1,
        "checkpoint_every": 0,
        "deepspeed": {
            "train_batch_size": 4 * gpus,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": 2},
        },
    }


def command(kind: str, work: Path, run_dir: Path) -> list[str]:
    if kind == "old":
        return [
            sys.executable,
            "-c",
            RUN_OLD,
            str(work / "old_launch.py"),
            str(work / "spec.json"),
            str(run_dir),
            str(work),
        ]
    return [
        sys.executable,
        "-m",
        "trainer",
        "run",
        "--spec",
        str(work / "spec.json"),
        "--run-dir",
        str(run_dir),
        "--model-root",
        str(work),
        "--data-root",
        str(work),
        "--no-save",
    ]


def start_event(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "events.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        event = json.loads(line)
        if event["type"] == "start":
            return event
    return None


def one_run(kind: str, work: Path, run_dir: Path, world: int) -> dict[str, float]:
    import psutil

    env = os.environ | {"PYTHONPATH": str(REPO)}
    launched = time.time()
    p = subprocess.Popen(
        command(kind, work, run_dir),
        cwd=REPO,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    ranks_up = None
    while p.poll() is None and ranks_up is None:
        try:
            ranks = [c for c in psutil.Process(p.pid).children() if "rank" in c.cmdline()]
            if len(ranks) == world:
                ranks_up = max(r.create_time() for r in ranks) - launched
        except psutil.Error:
            pass
        time.sleep(0.005)
    _, err = p.communicate(timeout=600)
    event = start_event(run_dir)
    if p.returncode != 0 or event is None or ranks_up is None:
        log = (run_dir / "train.log").read_text()[-3000:] if (run_dir / "train.log").exists() else ""
        raise SystemExit(f"{kind} launcher failed ({p.returncode}): {err.decode()[-2000:]}\n{log}")
    return {"ranks_up": ranks_up, "start": event["time"] - launched}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=2, help="ranks (CUDA devices when visible, else CPU)")
    parser.add_argument("--repeats", type=int, default=5)
    a = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="launch-bench-") as tmp:
        work = Path(tmp)
        old = subprocess.run(
            ["git", "show", f"{OLD_LAUNCHER_REV}:trainer/launch.py"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        )
        (work / "old_launch.py").write_text(old.stdout)
        write_corpus(work / "corpus.jsonl")
        (work / "spec.json").write_text(json.dumps(spec(a.gpus)))
        # One unmeasured run first: the OS file cache, DeepSpeed's op build and the token cache of a
        # first run would otherwise land on whichever launcher goes first.
        one_run("new", work, work / "warm-up", a.gpus)
        results: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
        for i in range(a.repeats):
            for kind in ("old", "new") if i % 2 == 0 else ("new", "old"):
                results[kind].append(one_run(kind, work, work / f"{kind}-{i}", a.gpus))
    import torch

    device = "cpu" if os.environ.get("CUDA_VISIBLE_DEVICES") == "" or not torch.cuda.is_available() else "cuda"
    print(
        f"{a.gpus} ranks on {device}, preset:tiny, {a.repeats} alternating repeats, {platform.machine()} "
        f"{os.cpu_count()} cores, python {platform.python_version()}, torch {torch.__version__}"
    )
    print(f"{'launcher':<26}{'ranks up':>18}{'rank start-up':>20}{'start':>20}   (median / min, s)")
    names = {"old": f"hand-written ({OLD_LAUNCHER_REV})", "new": "torch elastic (now)"}
    for kind, runs in results.items():
        up, start = [r["ranks_up"] for r in runs], [r["start"] for r in runs]
        columns = [up, [s - u for s, u in zip(start, up, strict=True)], start]
        print(f"{names[kind]:<26}" + "".join(f"{statistics.median(c):>11.3f} / {min(c):<6.3f}" for c in columns))
    for kind, runs in results.items():
        print(
            f"{kind} per repeat: ranks up "
            + " ".join(f"{r['ranks_up']:.3f}" for r in runs)
            + " | start "
            + " ".join(f"{r['start']:.3f}" for r in runs)
        )
    old_st = statistics.median(r["start"] for r in results["old"])
    new_st = statistics.median(r["start"] for r in results["new"])
    old_up = statistics.median(r["ranks_up"] for r in results["old"])
    new_up = statistics.median(r["ranks_up"] for r in results["new"])
    print(f"difference new - old (medians): ranks up {new_up - old_up:+.3f} s, start {new_st - old_st:+.3f} s")


if __name__ == "__main__":
    main()
