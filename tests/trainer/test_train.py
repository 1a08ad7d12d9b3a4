"""Real DeepSpeed runs on 2 CPU ranks (gloo): learning, outputs, resume, preemption, ZeRO stages."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.helpers import wait_for
from tests.trainer.conftest import WORDS, PortSquatter, events, start_trainer, step_losses, tiny_spec

pytestmark = pytest.mark.slow

# Resumed runs replay the same batches (order is a function of seed and step) from restored model,
# optimizer and scheduler state, on deterministic CPU kernels with a fixed thread count: the losses
# match to the last printed digit. The tolerance only absorbs the 5-digit rounding of the events.
RESUME_TOL = 2e-5

STEP_KEYS = {
    "step",
    "epoch",
    "loss",
    "lr",
    "samples_per_s",
    "tokens_per_s",
    "mfu",
    "gpu_mem_gb",
    "loss_scale",
    "skipped",
    "time",
    "tokens",
    "step_time_s",
}


def no_process_left(run_dir: Path) -> bool:
    return not [p for p in psutil.process_iter(["cmdline"]) if str(run_dir) in " ".join(p.info["cmdline"] or [])]


def test_tiny_run_learns_and_writes_complete_outputs(reference_run: Path) -> None:
    evs = events(reference_run)
    assert evs[0]["type"] == "start" and evs[-1]["type"] == "end"
    start = evs[0]
    assert (start["world_size"], start["micro_batch"], start["grad_accum"], start["train_batch_size"]) == (2, 2, 2, 8)
    assert start["total_steps"] == 30 and start["resumed_from_step"] == 0 and start["precision"] == "fp32"
    assert start["deepspeed_config"]["zero_optimization"]["stage"] == 2

    steps = [e for e in evs if e["type"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 31))
    for e in steps:
        assert e.keys() >= STEP_KEYS
        assert e["tokens_per_s"] > 0 and e["samples_per_s"] > 0
        assert e["tokens_per_s"] == pytest.approx(e["samples_per_s"] * 64, rel=1e-3)  # seq_len 64, all real
    assert steps[-1]["tokens"] == 30 * 8 * 64
    losses = [e["loss"] for e in steps]
    assert losses[-1] < 0.3 * losses[0], losses

    assert [e["step"] for e in evs if e["type"] == "checkpoint"] == [10, 20, 30]
    assert evs[-1] == evs[-1] | {"status": "succeeded", "error": None, "model_path": "model"}
    ckpts = sorted(p.name for p in (reference_run / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert ckpts == ["step-20", "step-30"]  # keep_checkpoints defaults to 2

    log = (reference_run / "train.log").read_text()
    assert "[rank 0]" in log and "[rank 1]" in log

    model = AutoModelForCausalLM.from_pretrained(reference_run / "model", local_files_only=True)
    tok = AutoTokenizer.from_pretrained(reference_run / "model", local_files_only=True)
    ids = tok("the quick brown fox jumps over the", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    # It learned the corpus: the continuation is words of the training sentence.
    continuation = tok.decode(out[0, ids.shape[1] :]).split()
    assert continuation and set(continuation[:3]) <= set(WORDS)


def test_resume_after_kill_continues_the_same_trajectory(reference_run: Path, data_root: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "killed"
    p = start_trainer(tiny_spec(), run_dir, data_root)
    wait_for(lambda: (run_dir / "checkpoints" / "step-10").is_dir(), timeout=240, what="checkpoint 10")
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    wait_for(lambda: no_process_left(run_dir), timeout=10, what="ranks gone with their launcher")

    p = start_trainer(tiny_spec(), run_dir, data_root)
    assert p.wait(timeout=300) == 0
    starts = [e for e in events(run_dir) if e["type"] == "start"]
    assert starts[-1]["resumed_from_step"] >= 10
    resumed_from = starts[-1]["resumed_from_step"]
    ref, got = step_losses(events(reference_run)), step_losses(events(run_dir))
    assert max(got) == 30
    for step in range(resumed_from + 1, 31):
        assert got[step] == pytest.approx(ref[step], abs=RESUME_TOL), step


def test_sigterm_checkpoints_exits_75_and_resumes(reference_run: Path, data_root: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "preempted"
    p = start_trainer(tiny_spec(), run_dir, data_root)
    wait_for(lambda: len(step_losses(events(run_dir))) >= 5, timeout=240, what="5 steps")
    os.killpg(p.pid, signal.SIGTERM)
    assert p.wait(timeout=60) == 75
    end = events(run_dir)[-1]
    assert end["type"] == "end" and end["status"] == "preempted"
    stopped_at = end["step"]
    assert 5 <= stopped_at < 30
    assert (run_dir / "checkpoints" / f"step-{stopped_at}" / "trainbox.json").is_file()
    assert no_process_left(run_dir)

    p = start_trainer(tiny_spec(), run_dir, data_root)
    assert p.wait(timeout=300) == 0
    assert [e for e in events(run_dir) if e["type"] == "start"][-1]["resumed_from_step"] == stopped_at
    ref, got = step_losses(events(reference_run)), step_losses(events(run_dir))
    for step in range(stopped_at + 1, 31):
        assert got[step] == pytest.approx(ref[step], abs=RESUME_TOL), step


@pytest.mark.parametrize(
    ("stage", "precision"),
    [(0, "bf16"), (1, "fp16"), (3, "bf16")],
)
def test_zero_stages_and_precisions(stage: int, precision: str, data_root: Path, tmp_path: Path) -> None:
    ds = {"zero_optimization": {"stage": stage}, precision: {"enabled": True}}
    if stage == 0:  # the scheduler block: warm up to the optimizer's lr, then decay over the run
        ds["scheduler"] = {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 2}}
    spec = tiny_spec(max_steps=4, checkpoint_every=2, deepspeed=ds)
    p = start_trainer(spec, tmp_path, data_root)
    assert p.wait(timeout=300) == 0, (tmp_path / "train.log").read_text()[-3000:]
    evs = events(tmp_path)
    start = evs[0]
    assert start["deepspeed_config"]["zero_optimization"]["stage"] == stage
    # CPU ranks cannot train in fp16: the run says so and uses bf16 (documented in docs/TRAINER.md).
    assert start["precision"] == "bf16"
    assert start["deepspeed_config"]["bf16"] == {"enabled": True}
    assert "fp16" not in start["deepspeed_config"]
    if precision == "fp16":
        assert any("fp16" in n and "bf16" in n for n in start["notes"])
        assert "running bf16 instead" in (tmp_path / "train.log").read_text()
    else:
        assert start["notes"] == []
    losses = step_losses(evs)
    assert list(losses) == [1, 2, 3, 4] and losses[4] < losses[1]
    # The free-space check's estimate is never below what this stage and precision really write.
    for ckpt in (tmp_path / "checkpoints").glob("step-*"):
        real = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
        assert real <= start["checkpoint_estimate_bytes"], (ckpt.name, real, start["checkpoint_estimate_bytes"])
    lrs = [e["lr"] for e in evs if e["type"] == "step"]
    if stage == 0:
        assert start["deepspeed_config"]["scheduler"]["params"]["total_num_steps"] == 4
        assert max(lrs) == pytest.approx(3e-3) and lrs[0] < max(lrs) and lrs[-1] < max(lrs), lrs
    else:
        assert lrs == [3e-3] * 4
    assert evs[-1]["status"] == "succeeded"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", local_files_only=True)
    assert model.config.hidden_size == 64
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_killed_rank_fails_the_job_with_its_exit_code(data_root: Path, tmp_path: Path) -> None:
    p = start_trainer(tiny_spec(max_steps=10_000, checkpoint_every=0), tmp_path, data_root)
    wait_for(lambda: len(step_losses(events(tmp_path))) >= 2, timeout=240, what="2 steps")
    rank1 = next(c for c in psutil.Process(p.pid).children() if "RANK" in c.environ() and c.environ()["RANK"] == "1")
    rank1.kill()
    assert p.wait(timeout=60) == 1
    end = events(tmp_path)[-1]
    assert end["type"] == "end" and end["status"] == "failed"
    assert end["error"]["type"] == "train_error"
    assert end["error"]["message"] == "rank 1 was killed by SIGKILL" and end["error"]["exit_code"] == -9
    wait_for(lambda: no_process_left(tmp_path), timeout=10, what="no rank left")


def test_ranks_that_do_not_stop_within_the_grace_are_killed_then(data_root: Path, tmp_path: Path) -> None:
    """--stop-grace bounds a stop: rank 1 frozen (SIGSTOP) cannot checkpoint, rank 0 waits on it in the
    next collective; both are SIGKILLed when the grace runs out, and the run fails saying so."""
    p = start_trainer(
        tiny_spec(max_steps=10_000, checkpoint_every=0), tmp_path, data_root, extra_args=("--stop-grace", "3")
    )
    wait_for(lambda: len(step_losses(events(tmp_path))) >= 2, timeout=240, what="2 steps")
    rank1 = next(c for c in psutil.Process(p.pid).children() if c.environ().get("RANK") == "1")
    rank1.suspend()
    stopped_at = time.monotonic()
    os.killpg(p.pid, signal.SIGTERM)
    assert p.wait(timeout=60) == 1
    assert 3 <= time.monotonic() - stopped_at < 20
    end = events(tmp_path)[-1]
    assert end["status"] == "failed" and end["error"]["exit_code"] == -9
    assert end["error"]["message"].endswith("was killed by SIGKILL")
    wait_for(lambda: no_process_left(tmp_path), timeout=10, what="no rank left")


def test_invalid_data_fails_fast_without_starting_ranks(data_root: Path, tmp_path: Path) -> None:
    spec = tiny_spec(dataset={"path": "corpus.jsonl", "text_field": "body"})
    p = start_trainer(spec, tmp_path, data_root)
    assert p.wait(timeout=60) == 2
    (end,) = events(tmp_path)
    assert end["status"] == "failed" and end["error"]["type"] == "invalid"
    assert "no text field 'body'" in end["error"]["message"]
    assert not (tmp_path / "train.log").exists()


def test_out_of_memory_is_reported_as_oom_with_the_figure(data_root: Path, tmp_path: Path) -> None:
    """A real allocation failure: the 1.3B preset under a 5 GiB address-space limit."""
    import json
    import resource
    import subprocess

    from tests.trainer.conftest import trainer_cmd

    spec = tiny_spec(
        model="preset:deepseek-1.3b",
        gpus=1,
        max_steps=1,
        deepspeed={"train_batch_size": 1, "gradient_accumulation_steps": 1},
    )
    (tmp_path / "spec.json").write_text(json.dumps(spec))

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (5 * 2**30, 5 * 2**30))

    env = os.environ | {"CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        trainer_cmd(tmp_path / "spec.json", tmp_path, data_root),
        env=env,
        preexec_fn=limit,
        capture_output=True,
        timeout=300,
    )
    assert proc.returncode == 1
    end = events(tmp_path)[-1]
    assert end["status"] == "failed" and end["error"]["type"] == "oom"
    assert "out of host memory: could not allocate" in end["error"]["message"]
    assert "GiB resident" in end["error"]["message"]


def _idle_ranks(launcher_pid: int, world: int) -> list[psutil.Process]:
    """The launcher's ranks once all are idle for a second: waiting on something, past their imports."""
    ranks = [c for c in psutil.Process(launcher_pid).children() if "rank" in c.cmdline()]
    if len(ranks) != world:
        return []
    before = [sum(r.cpu_times()[:2]) for r in ranks]
    time.sleep(1.0)
    after = [sum(r.cpu_times()[:2]) for r in ranks]
    return ranks if all(b - a < 0.05 for a, b in zip(before, after, strict=True)) else []


def test_sigterm_during_start_up_ends_every_rank_at_once(data_root: Path, tmp_path: Path) -> None:
    """Ranks stuck before training (here on a DeepSpeed build lock that is never released) have nothing
    to checkpoint: SIGTERM ends them at once, and the run says `preempted`, not failed."""
    ext = tmp_path / "ext"
    (ext / "deepspeed_shm_comm").mkdir(parents=True)
    fd = os.open(ext / "deepspeed_shm_comm" / "lock", os.O_CREAT | os.O_EXCL)  # a build that never ends
    run_dir = tmp_path / "run"
    p = start_trainer(tiny_spec(), run_dir, data_root, extra_env={"TORCH_EXTENSIONS_DIR": str(ext)})
    try:
        wait_for(lambda: _idle_ranks(p.pid, 2), timeout=180, interval=0.5, what="both ranks waiting on the lock")
        os.killpg(p.pid, signal.SIGTERM)
        assert p.wait(timeout=15) == 75
    finally:
        os.close(fd)
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    evs = events(run_dir)
    assert [e["type"] for e in evs] == ["end"]
    assert evs[0]["status"] == "preempted" and evs[0]["error"] is None
    assert no_process_left(run_dir)


def test_ports_taken_by_other_programs_or_jobs_never_fail_a_run(data_root: Path, tmp_path: Path) -> None:
    """Two jobs at once while another program holds 29500.. and grabs each job's MASTER_PORT the moment
    a rank shows it: the launchers already hold their rendezvous stores there, so both runs succeed."""
    spec = tiny_spec(max_steps=2, checkpoint_every=0)
    with PortSquatter(str(tmp_path)) as squatter:
        procs = [start_trainer(spec, tmp_path / name, data_root) for name in ("a", "b")]
        codes = [p.wait(timeout=300) for p in procs]
    assert codes == [0, 0], [(tmp_path / n / "train.log").read_text()[-2000:] for n in ("a", "b")]
    assert len(squatter.ports) == 2, f"each job its own port: {squatter.ports}"
    assert all(squatter.ports.values()), f"a port was free when its ranks started: {squatter.ports}"
    for name in ("a", "b"):
        assert events(tmp_path / name)[-1]["status"] == "succeeded"
        assert no_process_left(tmp_path / name)


@pytest.mark.parametrize("when", ["after the rendezvous", "after the first rank started"])
def test_a_stop_before_every_rank_started_starts_no_more(
    when: str, data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM after the launcher took over its signals but before every rank started (a job cancelled
    right after its launch): no more rank starts, those started are stopped, and the run says
    `preempted`. Such a stop once reached no rank, and the run trained on until the supervisor's
    SIGKILL, or to the end."""
    import argparse
    import json

    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import DynamicRendezvousHandler

    from trainer import launch

    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(tiny_spec(max_steps=2, checkpoint_every=0)))
    run_dir = tmp_path / "run"
    args = argparse.Namespace(
        spec=str(spec_file),
        run_dir=str(run_dir),
        model_root=str(data_root),
        data_root=str(data_root),
        stop_grace=30,
        no_save=True,
        token_cache_bytes=0,
    )

    def sigterm() -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # taken by the launcher's handler, as the worker's would be

    if when == "after the rendezvous":  # the agent store is up, no rank is started
        next_rendezvous = DynamicRendezvousHandler.next_rendezvous

        def rendezvous_then_sigterm(self: DynamicRendezvousHandler) -> object:
            info = next_rendezvous(self)
            sigterm()
            return info

        monkeypatch.setattr(DynamicRendezvousHandler, "next_rendezvous", rendezvous_then_sigterm)
    else:  # elastic is starting the ranks: rank 0 runs, rank 1 is not started yet
        rank_class = launch._rank_handler_class

        def stop_after_the_first() -> type:
            class Rank(rank_class()):  # type: ignore[misc]
                def _popen(self, *a: object) -> object:
                    proc = super()._popen(*a)
                    sigterm()
                    return proc

            return Rank

        monkeypatch.setattr(launch, "_rank_handler_class", stop_after_the_first)
    launcher = launch.Launcher(args)
    assert launcher.run() == 75
    assert [r.rank for r in launcher.ranks] == ([] if when == "after the rendezvous" else [0])
    assert all(r.proc.returncode == -signal.SIGTERM for r in launcher.ranks)
    evs = events(run_dir)
    assert [e["type"] for e in evs] == ["end"] and evs[0]["status"] == "preempted"
    assert no_process_left(run_dir)
