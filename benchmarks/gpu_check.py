"""The GPU check (issue 11): trainer bench, the article's plain loop and one service job, time-boxed.

    scripts/gpu_check.sh            # on the lent GPU machine (installs the carried wheels first)
    scripts/gpu_check.sh --cpu      # the same stages on CPU with preset:tiny, in a few minutes

Stages, in one run, each with a time box inside `--budget` seconds; a stage that cannot get its
minimum is skipped, and every skip says why:
  env    the device: torch's CUDA view, NVML's inventory, the dense bf16 peak the MFU uses;
  prep   (background, from the start) the plain loop's saved Hugging Face model and JSONL documents,
         and on GPU DeepSpeed's FusedAdam JIT build, which the plain loop's config optimizer loads:
         build time stays out of every measurement;
  bench  `python -m trainer bench` (the trainer's own bench) on preset:deepseek-1.3b, bf16, ZeRO-2,
         seq 2048, one GPU, global batches 16 and 32 at micro batch 8; MFU, tokens/s, peak memory,
         and api.estimate's per-GPU estimate for the same spec;
  plain  benchmarks/plain_loop.py, the article's DeepSpeed loop (documents padded to seq_len,
         optimizer from the config), same model shape, seq, batch 16 = micro 8 x accumulation 2,
         bf16, ZeRO-2, on the same GPU; real (non-pad) tokens/s, against the bench's batch 16;
  e2e    the embedded stack (`trainbox up`'s Stack: SQLite, its own Redis, API, worker) runs one
         preset:tiny job on one GPU: GET /gpus against NVML, the rank's CUDA_VISIBLE_DEVICES
         against the job's gpu_ids (and NVML's process list of that GPU), the fused AdamW, and
         the job's peak memory against POST /jobs/validate's estimate.
Then the goals (MFU >= 45%, >= 1.5x the plain loop, peak memory within 10% of the estimate), each
PASS, FAIL or SKIP with its figures. Everything goes to stdout and to `--out` (gpu_check.json, one
log per stage).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GOAL_MFU = 0.45
GOAL_RATIO = 1.5
GOAL_MEM = 0.10  # |peak - estimate| / estimate


@dataclass(frozen=True)
class Mode:
    """What each stage runs, and its time box (s) and the least it is worth starting with (s)."""

    name: str
    model: str
    shape: str
    seq_len: int
    batch_sizes: tuple[int, ...]
    max_micro: int
    steps: int
    warmup: int
    plain_batch: int
    plain_accum: int
    e2e_seq: int
    e2e_batch: int
    e2e_steps: int
    boxes: dict[str, tuple[float, float]]


GPU = Mode(
    name="gpu",
    model="preset:deepseek-1.3b",
    shape="deepseek-1.3b",
    seq_len=2048,
    batch_sizes=(16, 32),
    max_micro=8,
    steps=8,
    warmup=3,
    plain_batch=16,
    plain_accum=2,
    e2e_seq=512,
    e2e_batch=16,
    e2e_steps=60,
    boxes={"bench": (180, 70), "plain": (120, 60), "e2e": (110, 60)},
)
CPU = Mode(
    name="cpu",
    model="preset:tiny",
    shape="tiny",
    seq_len=64,
    batch_sizes=(8, 16),
    max_micro=8,
    steps=3,
    warmup=1,
    plain_batch=16,
    plain_accum=2,
    e2e_seq=64,
    e2e_batch=8,
    e2e_steps=20,
    boxes={"bench": (150, 60), "plain": (150, 60), "e2e": (150, 60)},
)


class Run:
    """The run's clock, output folder, results and printed report."""

    def __init__(self, out: Path, budget_s: float) -> None:
        self.out = out
        self.t0 = time.monotonic()
        self.deadline = self.t0 + budget_s
        self.results: dict[str, Any] = {"stages": {}, "skipped": [], "failures": [], "goals": {}}

    def say(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {msg}", flush=True)

    def skip(self, what: str, why: str) -> None:
        self.results["skipped"].append({"what": what, "why": why})
        self.say(f"SKIP {what}: {why}")

    def fail(self, what: str, why: str) -> None:
        self.results["failures"].append({"what": what, "why": why})
        self.say(f"FAIL {what}: {why}")

    def box(self, stage: str, mode: Mode, later: tuple[str, ...]) -> float | None:
        """Seconds this stage may take, leaving later stages their minimum; None: not worth starting."""
        want, least = mode.boxes[stage]
        left = self.deadline - time.monotonic() - sum(mode.boxes[s][1] for s in later)
        if left < least:
            self.skip(stage, f"{left:.0f}s left of the budget once later stages keep their minimum; needs {least:.0f}s")
            return None
        return min(want, left)

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=2, default=str))


def run_logged(cmd: list[str], log: Path, timeout: float, env: dict[str, str] | None = None) -> int | None:
    """Run `cmd` in its own session with output to `log`; kill its whole group at `timeout`; None: timed out."""
    with log.open("ab") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None


def kill_leftovers(work: Path) -> list[int]:
    """Kill what a timed-out stage left (ranks sit in their own process groups): any process naming `work`."""
    import psutil

    killed = []
    for p in psutil.process_iter(["pid", "cmdline", "cwd"]):
        # The cwd catches compilers of a JIT build: ninja starts them in process groups of their own.
        named = str(work) in " ".join(p.info["cmdline"] or []) or str(p.info["cwd"] or "").startswith(str(work))
        if p.pid != os.getpid() and named:
            with contextlib.suppress(psutil.Error):
                p.kill()
                killed.append(p.pid)
    return killed


def tail(path: Path, n: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


# --- env ---------------------------------------------------------------------------------------------


def device_facts() -> dict[str, Any]:
    """Versions, torch's CUDA view, NVML's inventory (run in a child: see stage_env)."""
    import torch

    from trainer.hardware import nvml, peak_flops

    env: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": False}
    with contextlib.suppress(ImportError):
        import transformers

        env["transformers"] = transformers.__version__
    with contextlib.suppress(ImportError):
        import deepspeed

        env["deepspeed"] = deepspeed.__version__
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env |= {
            "cuda_available": True,
            "device": props.name,
            "device_memory_gb": round(props.total_memory / 1024**3, 1),
            "devices": torch.cuda.device_count(),
            "bf16": torch.cuda.is_bf16_supported(),
            "peak_tflops": (peak_flops(props.name) or 0) / 1e12 or None,
        }
    with nvml() as pynvml:
        if pynvml is None:
            env["nvml"] = None
        else:
            env["nvml"] = [
                {
                    "index": i,
                    "name": str(pynvml.nvmlDeviceGetName(h)),
                    "memory_mb": int(pynvml.nvmlDeviceGetMemoryInfo(h).total // (1 << 20)),
                }
                for i in range(pynvml.nvmlDeviceGetCount())
                for h in [pynvml.nvmlDeviceGetHandleByIndex(i)]
            ]
    return env


def stage_env(run: Run) -> dict[str, Any]:
    """The device facts, from a child process: this process must hold no CUDA context, or the worker
    of the e2e stage would find a foreign process on its GPU and not launch there."""
    me = str(Path(__file__).resolve())
    out = subprocess.run([sys.executable, me, "_env"], cwd=REPO, capture_output=True, text=True, timeout=120)
    line = next((x for x in reversed(out.stdout.splitlines()) if x.startswith("{")), None)
    if out.returncode != 0 or line is None:
        raise SystemExit(f"could not read the device facts (exit {out.returncode}):\n{out.stderr[-3000:]}")
    env: dict[str, Any] = json.loads(line)
    run.say(f"env: {json.dumps(env)}")
    if env["cuda_available"] and env.get("peak_tflops") is None:
        run.say("  no dense bf16 peak known for this device (trainer/hardware.py): MFU will be missing")
    return env


# --- prep (background) -------------------------------------------------------------------------------


def prep(a: argparse.Namespace) -> None:
    """The plain loop's inputs: the model saved in Hugging Face format, and mixed-length JSONL documents."""
    from benchmarks.plain_vs_trainer import SHAPES, save_model, write_docs

    work = Path(a.work)
    t0 = time.perf_counter()
    save_model(SHAPES[a.shape], work / "models" / "bench")
    write_docs(work / "docs.jsonl", a.docs, a.seq_len)
    print(f"prep: {a.shape} saved and {a.docs} documents written in {time.perf_counter() - t0:.1f}s", flush=True)


def start_background(run: Run, mode: Mode, work: Path, on_gpu: bool) -> dict[str, subprocess.Popen[bytes]]:
    docs = mode.plain_batch * (mode.steps + mode.warmup + 2) * 2
    me = str(Path(__file__).resolve())
    cmd = [sys.executable, me, "_prep", "--work", str(work), "--shape", mode.shape]
    cmd += ["--seq-len", str(mode.seq_len), "--docs", str(docs)]
    jobs = {"prep": cmd}
    if on_gpu:
        build = "from deepspeed.ops.op_builder import FusedAdamBuilder as B; B().load(verbose=False); print('built')"
        jobs["ops"] = [sys.executable, "-c", build]
    # A few cores only: the bench measures meanwhile, and its ranks' launch threads must not starve.
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(work / "ext"), OMP_NUM_THREADS="4", MAX_JOBS="4")
    procs = {}
    for name, cmd in jobs.items():
        f = (run.out / f"{name}.log").open("ab")
        procs[name] = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        f.close()
    run.say(
        f"background: {', '.join(procs)} started (plain loop inputs" + (", FusedAdam JIT build)" if on_gpu else ")")
    )
    return procs


def wait_background(run: Run, proc: subprocess.Popen[bytes], name: str, until: float) -> bool:
    try:
        code = proc.wait(max(0.0, until - time.monotonic()))
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        run.say(f"  {name} did not finish in time; its log ends:\n{tail(run.out / f'{name}.log')}")
        return False
    if code != 0:
        run.say(f"  {name} failed (exit {code}); its log ends:\n{tail(run.out / f'{name}.log')}")
    return code == 0


# --- bench -------------------------------------------------------------------------------------------


def memory_estimate(mode: Mode, batch: int, gpus: int, precision: str) -> float | None:
    """api.estimate's per-GPU figure for the bench's spec of this batch size (what POST /jobs/validate says)."""
    from api.estimate import estimate_memory
    from trainer.bench import pick_micro
    from trainer.presets import PRESETS
    from trainer.spec import JobSpec

    micro = pick_micro(batch, gpus, mode.max_micro)
    ds: dict[str, Any] = {
        "train_batch_size": batch,
        "train_micro_batch_size_per_gpu": micro,
        "zero_optimization": {"stage": 2},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01}},
    }
    if precision != "fp32":
        ds[precision] = {"enabled": True}
    spec = JobSpec.model_validate(
        {"name": "est", "model": mode.model, "dataset": {"path": "corpus.txt"}, "gpus": gpus, "seq_len": mode.seq_len}
        | {"max_steps": 1, "deepspeed": ds}
    )
    est = estimate_memory(spec, PRESETS[mode.model.removeprefix("preset:")], precision)
    return est["per_gpu_gb"]


def stage_bench(run: Run, mode: Mode, work: Path, timeout: float, on_gpu: bool) -> list[dict[str, Any]]:
    from trainer.bench import summarize
    from trainer.events import read_events

    bench_dir = work / "bench"
    cmd = [sys.executable, "-m", "trainer", "bench", "--model", mode.model, "--gpus", "1"]
    cmd += ["--batch-sizes", ",".join(map(str, mode.batch_sizes)), "--seq-len", str(mode.seq_len)]
    cmd += ["--precision", "bf16", "--zero", "2", "--max-micro", str(mode.max_micro)]
    cmd += ["--steps", str(mode.steps), "--warmup", str(mode.warmup), "--work-dir", str(bench_dir)]
    cmd += ["--json", str(run.out / "bench.json")]
    run.say(f"bench: {' '.join(cmd[1:])} (box {timeout:.0f}s)")
    code = run_logged(cmd, run.out / "bench.log", timeout)
    if code is None:
        run.fail("bench", f"timed out after {timeout:.0f}s; batch sizes not reached are reported as missing")
        kill_leftovers(work)
    rows = []
    for batch in mode.batch_sizes:
        events = read_events(bench_dir / f"bs{batch}")
        if not events:
            run.skip(f"bench batch {batch}", "not reached within the stage's time box")
            continue
        row = {"batch_size": batch, **summarize(events, mode.warmup)}
        row["estimate_gb"] = memory_estimate(mode, batch, 1, row.get("precision") or "bf16")
        rows.append(row)
        mem = row.get("peak_mem_gb")
        mfu = row.get("mfu")
        if "tokens_per_s" not in row:
            run.say(f"  batch {batch}: {row.get('status')}: {(row.get('error') or {}).get('message')}")
            continue
        run.say(
            f"  batch {batch} ({row['micro']}x{row['accum']}): {row['tokens_per_s']:,.0f} tokens/s, "
            f"{row['samples_per_s']:.2f} samples/s, MFU {f'{mfu:.1%}' if mfu is not None else '- (no GPU peak)'}, "
            f"peak {f'{mem:.2f} GiB' if mem is not None else '- (CPU)'} vs estimate {row['estimate_gb']} GiB"
        )
    if code not in (0, None):
        run.fail("bench", f"exit {code}; bench.log and the runs' train.log (below) say why")
        for train_log in sorted(bench_dir.glob("bs*/train.log")):
            run.say(f"  {train_log.parent.name}/train.log ends:\n{tail(train_log)}")
    return rows


# --- plain -------------------------------------------------------------------------------------------


def stage_plain(
    run: Run, mode: Mode, work: Path, timeout: float, on_gpu: bool, background: dict[str, subprocess.Popen[bytes]]
) -> dict[str, Any] | None:
    from benchmarks.plain_vs_trainer import rank_env

    until = time.monotonic() + timeout
    if not wait_background(run, background["prep"], "prep", until - 20):
        run.fail("plain", "its model and documents were not ready (prep.log)")
        return None
    optimizer: dict[str, Any] = {
        "type": "AdamW",
        "params": {"lr": 5e-5, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01},
    }
    note = "DeepSpeed's optimizer from the config (FusedAdam)"
    if not on_gpu:
        # On CPU DeepSpeed's FusedAdam is a C++ op that takes minutes to compile on 2 busy cores.
        optimizer["params"]["torch_adam"] = True
        note = "DeepSpeed's torch_adam (torch.optim.AdamW; CPU mode skips the CPU FusedAdam build)"
    if "ops" in background and not wait_background(run, background["ops"], "ops", until - 30):
        # Without the JIT-built FusedAdam, DeepSpeed's torch_adam option is the article's loop minus that op.
        optimizer["params"]["torch_adam"] = True
        note = "FusedAdam did not build (ops.log): DeepSpeed's torch_adam (torch.optim.AdamW) instead"
        kill_leftovers(work / "ext")  # its compilers, if it was stopped mid-build
    config = {
        "train_batch_size": mode.plain_batch,
        "gradient_accumulation_steps": mode.plain_accum,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 2},
        "optimizer": optimizer,
    }
    (work / "plain.json").write_text(json.dumps(config))
    out = work / "plain.out.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "plain_loop.py"), "--model-dir", str(work / "models" / "bench")]
    cmd += ["--corpus", str(work / "docs.jsonl"), "--config", str(work / "plain.json"), "--seq-len", str(mode.seq_len)]
    cmd += ["--steps", str(mode.steps), "--warmup", str(mode.warmup), "--out", str(out)]
    env = rank_env(1, on_gpu) | {"RANK": "0", "LOCAL_RANK": "0"}
    if on_gpu:
        env["TORCH_EXTENSIONS_DIR"] = str(work / "ext")  # where the background built FusedAdam
    left = until - time.monotonic()
    run.say(
        f"plain: the article's loop, batch {mode.plain_batch} = {mode.plain_batch // mode.plain_accum}x"
        f"{mode.plain_accum}, {note} (box {left:.0f}s)"
    )
    code = run_logged(cmd, run.out / "plain.log", left, env)
    if code != 0 or not out.exists():
        why = "timed out" if code is None else f"exit {code}"
        run.say(f"  plain.log ends:\n{tail(run.out / 'plain.log')}")
        run.fail("plain", f"the plain loop {why}")
        kill_leftovers(work)
        return None
    result = json.loads(out.read_text()) | {"optimizer": note, "batch": mode.plain_batch, "accum": mode.plain_accum}
    run.say(
        f"  plain: {result['tokens_per_s']:,.0f} real tokens/s, {result['samples_per_s']:.2f} samples/s, "
        f"pad share {result['pad_fraction']:.1%}"
    )
    return result


# --- e2e ---------------------------------------------------------------------------------------------


def _ranks_of(run_dir: Path) -> list[dict[str, Any]]:
    """The job's rank processes (they carry RANK in their environment) and what they were given."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if "trainer" not in cmdline or str(run_dir) not in cmdline:
            continue
        with contextlib.suppress(psutil.Error):
            env = p.environ()
            if "RANK" in env:
                found.append(
                    {
                        "pid": p.pid,
                        "rank": env["RANK"],
                        "CUDA_VISIBLE_DEVICES": env.get("CUDA_VISIBLE_DEVICES"),
                        "CUDA_DEVICE_ORDER": env.get("CUDA_DEVICE_ORDER"),
                    }
                )
    return found


def _nvml_pids(index: int) -> list[int] | None:
    from trainer.hardware import nvml

    with nvml() as pynvml:
        if pynvml is None:
            return None
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        return sorted({int(p.pid) for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h)})


def stage_e2e(
    run: Run, mode: Mode, work: Path, timeout: float, on_gpu: bool, env_info: dict[str, Any], ext: Path | None
) -> dict[str, Any]:
    from client.sdk import Client
    from client.stack import Stack, free_port
    from trainer.events import read_events

    until = time.monotonic() + timeout
    checks: dict[str, Any] = {}
    for k in [k for k in os.environ if k.startswith("TRAINBOX_")]:
        os.environ.pop(k)  # the stack's own SQLite and Redis, whatever this shell had configured
    data_dir = work / "stack"
    (data_dir / "data").mkdir(parents=True)
    words = "the quick brown fox jumps over the lazy dog and then runs back home to sleep".split()  # noqa: SIM905
    with (data_dir / "data" / "gc.jsonl").open("w") as f:
        for i in range(2000):
            f.write(json.dumps({"text": " ".join(words[(i + j) % len(words)] for j in range(60))}) + "\n")
    extra = {} if on_gpu else {"CUDA_VISIBLE_DEVICES": "", "TRAINBOX_CPU_SLOTS": "1"}
    if ext is not None:
        extra["TRAINBOX_TORCH_EXTENSIONS_DIR"] = str(ext)  # the ops built at the start: the worker only loads them
    stack = Stack(data_dir=data_dir, port=free_port(), extra_env=extra, on_event=run.say)
    spec = {
        "name": "gpu-check",
        "model": "preset:tiny",
        "dataset": {"path": "gc.jsonl"},
        "gpus": 1,
        "seq_len": mode.e2e_seq,
        "max_steps": mode.e2e_steps,
        "checkpoint_every": 0,
        "max_runtime_s": int(timeout),
        "deepspeed": {
            "train_batch_size": mode.e2e_batch,
            "gradient_accumulation_steps": 1,
            "bf16": {"enabled": True},
            "zero_optimization": {"stage": 2},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        },
    }
    run.say(f"e2e: embedded stack, one preset:tiny job on 1 {'GPU' if on_gpu else 'CPU slot'} (box {timeout:.0f}s)")
    try:
        stack.start(ready_timeout_s=max(10.0, min(90.0, until - time.monotonic() - 20)), on_step=lambda m: None)
        client = Client(stack.url, token=stack.token())
        # The API is up before the worker has registered its box (after its op build): wait for it.
        while not (boxes := client.gpus()["data"]) and time.monotonic() < until - 60:
            time.sleep(0.5)
        listed = [
            {"index": g["index"], "name": g["name"], "memory_mb": g["memory_mb"]} for b in boxes for g in b["gpus"]
        ]
        nv = env_info.get("nvml")
        if nv is None:
            checks["nvml_inventory"] = {"status": "SKIP", "why": "no NVML here (CPU box)", "gpus_listed": listed}
        else:
            same = sorted(listed, key=lambda g: g["index"]) == nv
            checks["nvml_inventory"] = {"status": "PASS" if same else "FAIL", "gpus_listed": listed, "nvml": nv}
        run.say(f"  GET /gpus: {listed} -> {checks['nvml_inventory']['status']}")
        est = client.validate(spec)["memory"]
        job = client.submit(spec)
        run_dir = data_dir / "runs" / job["id"]
        ranks: list[dict[str, Any]] = []
        nvml_pids: list[int] | None = None
        while time.monotonic() < until - 5:
            job = client.get(job["id"])
            if job["state"] in ("succeeded", "failed", "cancelled"):
                break
            if job["state"] == "running":
                ranks = ranks or _ranks_of(run_dir)
                if ranks and on_gpu and job.get("gpu_ids") and not nvml_pids:
                    nvml_pids = _nvml_pids(job["gpu_ids"][0])
            time.sleep(0.2)
        else:
            client.cancel(job["id"])
            run.say(f"  job {job['id']} still {job['state']} at the end of the box: cancelled")
        checks["job"] = {k: job.get(k) for k in ("id", "state", "gpu_ids", "latest", "error")}
        run.say(f"  job {job['id']}: {job['state']} on gpu_ids {job.get('gpu_ids')}, latest {job.get('latest')}")
        if job["state"] != "succeeded":
            run.fail("e2e job", f"{job['state']}: {job.get('error')}")
        events = read_events(run_dir)
        start = next((e for e in events if e["type"] == "start"), {})
        # CUDA_VISIBLE_DEVICES: the worker gives the rank exactly the job's GPUs, in NVML's (PCI) order.
        want = ",".join(str(i) for i in job.get("gpu_ids") or []) if on_gpu else ""
        if not ranks:
            checks["cuda_visible_devices"] = {"status": "SKIP", "why": "no rank process was seen while the job ran"}
        else:
            seen = {r["CUDA_VISIBLE_DEVICES"] for r in ranks}
            ok = seen == {want} and (not on_gpu or {r["CUDA_DEVICE_ORDER"] for r in ranks} == {"PCI_BUS_ID"})
            checks["cuda_visible_devices"] = {"status": "PASS" if ok else "FAIL", "want": want, "ranks": ranks}
            if on_gpu and nv and job.get("gpu_ids"):
                # The rank's CUDA device 0 is NVML's GPU gpu_ids[0]: same name; and NVML sees a process there.
                nvml_name = next((g["name"] for g in nv if g["index"] == job["gpu_ids"][0]), None)
                checks["cuda_visible_devices"] |= {
                    "rank_device": start.get("device"),
                    "nvml_name_of_gpu_id": nvml_name,
                    "nvml_pids_on_gpu_id": nvml_pids,
                    "rank_pid_in_nvml": bool(nvml_pids and {r["pid"] for r in ranks} & set(nvml_pids)),
                }
                if start.get("device") != nvml_name:
                    checks["cuda_visible_devices"]["status"] = "FAIL"
        run.say(f"  CUDA_VISIBLE_DEVICES: {json.dumps(checks['cuda_visible_devices'])}")
        opt = start.get("optimizer") or {}
        if "fused" in opt:
            ok = bool(opt["fused"]) == on_gpu
            checks["fused_adamw"] = {"status": "PASS" if ok else "FAIL", "optimizer": opt}
        else:
            checks["fused_adamw"] = {
                "status": "SKIP",
                "why": "the start event does not say whether the optimizer is fused (trainer/rank.py builds "
                "torch AdamW with fused=on_gpu; the event's optimizer summary has no `fused` field)",
                "optimizer": opt,
                "device": start.get("device"),
            }
        run.say(f"  fused AdamW: {json.dumps(checks['fused_adamw'])}")
        peak = (job.get("latest") or {}).get("gpu_mem_gb")
        checks["memory"] = {"estimate": est, "peak_gb": peak}
        if peak is not None and est.get("per_gpu_gb"):
            checks["memory"]["ratio"] = round(peak / est["per_gpu_gb"], 3)
        run.say(
            f"  memory: peak {peak} GiB vs estimate {est.get('per_gpu_gb')} GiB (breakdown {est.get('breakdown_gb')}); "
            "for a tiny model the estimate's fixed 1 GiB overhead dominates: the goal is judged on the bench"
        )
    except Exception as e:  # the report still comes out, with the reason
        checks["error"] = f"{type(e).__name__}: {e}"
        run.fail("e2e", checks["error"])
    finally:
        stack.stop()
        if killed := kill_leftovers(work):
            run.say(f"  killed {len(killed)} processes the stack left behind: {killed}")
        logs = data_dir / "logs"
        with (run.out / "e2e.log").open("w") as f:
            for name in ("api", "worker", "redis"):
                f.write(f"==> {name}.log <==\n{tail(logs / f'{name}.log', 80)}\n")
            for train_log in sorted((data_dir / "runs").glob("*/train.log")):
                f.write(f"==> {train_log} <==\n{tail(train_log, 80)}\n")
    return checks


# --- goals -------------------------------------------------------------------------------------------


def goals(run: Run, rows: list[dict[str, Any]], plain: dict[str, Any] | None, on_gpu: bool) -> None:
    out = run.results["goals"]
    done = [r for r in rows if "tokens_per_s" in r]
    with_mfu = [r for r in done if r.get("mfu") is not None]
    if not with_mfu:
        out["mfu"] = {"status": "SKIP", "why": "no MFU: no GPU with a known peak" if done else "no bench result"}
    else:
        best = max(with_mfu, key=lambda r: r["mfu"])
        out["mfu"] = {
            "status": "PASS" if best["mfu"] >= GOAL_MFU else "FAIL",
            "best": round(best["mfu"], 4),
            "at_batch": best["batch_size"],
            "goal": GOAL_MFU,
        }
    same = next((r for r in done if plain and r["batch_size"] == plain["batch"]), None)
    if same is None or plain is None:
        out["vs_plain"] = {"status": "SKIP", "why": "the bench or the plain loop has no result at the same batch"}
    else:
        ratio = same["tokens_per_s"] / plain["tokens_per_s"]
        out["vs_plain"] = {
            "status": "PASS" if ratio >= GOAL_RATIO else "FAIL",
            "ratio_real_tokens": round(ratio, 3),
            # Positions (padded or not) per second: how much of the ratio is packing, how much the engine.
            "ratio_samples": round(same["samples_per_s"] / plain["samples_per_s"], 3),
            "trainer_tokens_per_s": round(same["tokens_per_s"]),
            "plain_tokens_per_s": round(plain["tokens_per_s"]),
            "plain_pad_share": round(plain["pad_fraction"], 3),
            "at_batch": same["batch_size"],
            "goal": GOAL_RATIO,
        }
    mem_rows = [r for r in done if r.get("peak_mem_gb") is not None and r.get("estimate_gb")]
    if not mem_rows:
        out["memory"] = {"status": "SKIP", "why": "no peak GPU memory (CPU ranks report none)" if done else "no bench"}
    else:
        errs = {r["batch_size"]: round(r["peak_mem_gb"] / r["estimate_gb"] - 1, 3) for r in mem_rows}
        out["memory"] = {
            "status": "PASS" if all(abs(e) <= GOAL_MEM for e in errs.values()) else "FAIL",
            "peak_over_estimate_minus_1": errs,
            "peak_gb": {r["batch_size"]: r["peak_mem_gb"] for r in mem_rows},
            "estimate_gb": {r["batch_size"]: r["estimate_gb"] for r in mem_rows},
            "goal": GOAL_MEM,
        }


def report(run: Run, mode: Mode, rows: list[dict[str, Any]], plain: dict[str, Any] | None) -> None:
    env = run.results["stages"].get("env", {})
    print(
        f"\n=== GPU check ({mode.name} mode) on {env.get('device', 'cpu')}, torch {env.get('torch')}, "
        f"DeepSpeed {env.get('deepspeed')}, {run.results.get('elapsed_s', '?')}s ==="
    )
    print(
        f"{mode.model}, seq {mode.seq_len}, bf16, ZeRO-2, 1 {'GPU' if mode.name == 'gpu' else 'CPU rank'}, "
        f"{mode.steps} measured steps after {mode.warmup} warm-up"
    )
    head = f"{'batch':>6}{'micro x acc':>12}{'tokens/s':>12}{'samples/s':>11}{'MFU':>8}{'peak GiB':>10}{'est GiB':>9}"
    print(f"{'':<24}{head}")
    for r in rows:
        if "tokens_per_s" not in r:
            print(
                f"{'trainer bench':<24}{r['batch_size']:>6}  {r.get('status')}: {(r.get('error') or {}).get('message')}"
            )
            continue
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        mem = f"{r['peak_mem_gb']:.2f}" if r.get("peak_mem_gb") is not None else "-"
        split = f"{r['micro']} x {r['accum']}"
        print(
            f"{'trainer bench':<24}{r['batch_size']:>6}{split:>12}{r['tokens_per_s']:>12,.0f}"
            f"{r['samples_per_s']:>11.2f}{mfu:>8}{mem:>10}{r['estimate_gb'] or '-':>9}"
        )
    if plain:
        split = f"{plain['batch'] // plain['accum']} x {plain['accum']}"
        print(
            f"{'plain loop (padded)':<24}{plain['batch']:>6}{split:>12}"
            f"{plain['tokens_per_s']:>12,.0f}{plain['samples_per_s']:>11.2f}{'-':>8}{'-':>10}{'-':>9}"
            f"   pad share {plain['pad_fraction']:.1%}"
        )
    e2e = run.results["stages"].get("e2e") or {}
    for name in ("nvml_inventory", "cuda_visible_devices", "fused_adamw"):
        if name in e2e:
            c = e2e[name]
            print(f"e2e {name:<22}{c['status']}" + (f"  ({c['why']})" if c.get("why") else ""))
    if e2e.get("job"):
        job = e2e["job"]
        print(f"e2e job {job['id']:<17} {job['state']}, latest {json.dumps(job.get('latest'))}")
    if e2e.get("memory"):
        m = e2e["memory"]
        print(f"e2e memory              peak {m['peak_gb']} GiB, estimate {m['estimate'].get('per_gpu_gb')} GiB")
    if e2e.get("error"):
        print(f"e2e error               {e2e['error']}")
    labels = {
        "mfu": f"MFU >= {GOAL_MFU:.0%}",
        "vs_plain": f">= {GOAL_RATIO}x plain loop",
        "memory": "peak within 10% of estimate",
    }
    if mode.name == "cpu":
        print("CPU mode: the goals are for an H100/H200; these verdicts only show that the check computes them")
    for key, label in labels.items():
        g = run.results["goals"][key]
        figures = {k: v for k, v in g.items() if k not in ("status", "why", "goal")}
        print(f"GOAL {label:<30}{g['status']:<5} {g.get('why') or json.dumps(figures)}")
    for s in run.results["skipped"]:
        print(f"skipped: {s['what']}: {s['why']}")
    for f in run.results["failures"]:
        print(f"failed: {f['what']}: {f['why']}")


def cpu_ops(run: Run) -> Path | None:
    """CPU ranks load DeepSpeed's shm comm op, JIT-built on first use (minutes on 2 busy cores): build it
    once now, in the project's op cache, so no stage measures or times out on the build."""
    from worker.ops import OpsError, prepare_ops

    ext = Path(
        os.environ.get("TRAINBOX_TORCH_EXTENSIONS_DIR")
        or os.environ.get("TORCH_EXTENSIONS_DIR")
        or REPO / ".trainbox" / "torch_extensions"
    )
    os.environ["TORCH_EXTENSIONS_DIR"] = str(ext)  # every stage's ranks load from here
    box = max(30.0, min(300.0, run.deadline - time.monotonic() - 120))
    try:
        seconds = prepare_ops(accelerator="cpu", root=ext, timeout_s=box, env=dict(os.environ))
    except OpsError as e:
        run.fail("cpu ops", str(e))
        return ext
    run.say(f"cpu ops: DeepSpeed's CPU ops ready in {ext} ({seconds:.1f}s)")
    return ext


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    p = sub.add_parser("_prep")
    p.add_argument("--work", required=True)
    p.add_argument("--shape", required=True)
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--docs", type=int, required=True)
    ap.add_argument("--cpu", action="store_true", help="CPU mode: preset:tiny, CPU ranks, short stages")
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu-check-out", help="results folder ($OUT)")
    ap.add_argument("--budget", type=float, default=440.0, help="seconds for every stage together")
    ap.add_argument("--stages", default="bench,plain,e2e", help="which of bench, plain, e2e to run")
    sub.add_parser("_env")
    a = ap.parse_args()
    if a.cmd == "_prep":
        prep(a)
        return 0
    if a.cmd == "_env":
        print(json.dumps(device_facts()))
        return 0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    run = Run(out, a.budget)
    stages = [s.strip() for s in a.stages.split(",") if s.strip()]
    env_info = stage_env(run)
    run.results["stages"]["env"] = env_info
    on_gpu = env_info["cuda_available"] and not a.cpu
    mode = CPU if a.cpu else GPU
    if not a.cpu and not on_gpu:
        run.say("FAIL: no CUDA device visible (torch.cuda.is_available() is False); --cpu runs the CPU mode")
        run.results["goals"] = {k: {"status": "FAIL", "why": "no GPU"} for k in ("mfu", "vs_plain", "memory")}
        run.save()
        return 1
    if a.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # CPU ranks even where a GPU exists
    run.results["mode"] = mode.name
    for s in ("bench", "plain", "e2e"):
        if s not in stages:
            run.skip(s, "not in --stages")
    rows: list[dict[str, Any]] = []
    plain = None
    with tempfile.TemporaryDirectory(prefix="trainbox-gpu-check-") as tmp:
        work = Path(tmp)
        ext = None if on_gpu else cpu_ops(run)
        background = start_background(run, mode, work, on_gpu) if "plain" in stages else {}
        try:
            if "bench" in stages and (box := run.box("bench", mode, tuple(s for s in ("plain", "e2e") if s in stages))):
                rows = stage_bench(run, mode, work, box, on_gpu)
            run.results["stages"]["bench"] = rows
            run.save()
            if "plain" in stages and (box := run.box("plain", mode, ("e2e",) if "e2e" in stages else ())):
                plain = stage_plain(run, mode, work, box, on_gpu, background)
            run.results["stages"]["plain"] = plain
            run.save()
            if "e2e" in stages and (box := run.box("e2e", mode, ())):
                run.results["stages"]["e2e"] = stage_e2e(run, mode, work, box, on_gpu, env_info, ext)
        finally:
            for proc in background.values():
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
    goals(run, rows, plain, on_gpu)
    run.save()
    report(run, mode, rows, plain)
    failed = run.results["failures"] or any(g["status"] == "FAIL" for g in run.results["goals"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
