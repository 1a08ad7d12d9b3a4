"""The training loop of one rank: engine -> resume -> steps -> checkpoints -> final model."""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trainer import checkpoint
from trainer.data import PackedBatches
from trainer.events import EXIT_OK, EXIT_PREEMPTED, EventWriter
from trainer.spec import JobSpec

GiB = 1024**3
NONFINITE_LIMIT = 3  # consecutive non-finite losses before the run is declared diverged


class Diverged(RuntimeError):
    """The loss went NaN or infinite and stayed there."""


@dataclass
class StopFlag:
    """Set from the SIGTERM handler; read between optimizer steps so a step is never cut in half."""

    requested: bool = False

    def install(self) -> None:
        """From now on SIGTERM/SIGINT ask for a checkpoint and a clean exit (before this they kill the rank)."""

        def on_signal(_signum: int, _frame: Any) -> None:
            self.requested = True

        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            signal.signal(signal.SIGTERM, on_signal)
            signal.signal(signal.SIGINT, on_signal)


@dataclass
class Loop:
    spec: JobSpec
    run_dir: Path
    engine: Any
    batches: PackedBatches
    device: torch.device
    events: EventWriter | None
    stop: StopFlag
    total_steps: int
    flops_per_token: float | None
    peak_flops: float | None
    precision: str
    save_outputs: bool = True
    checkpoint_bytes: int | None = None  # free space each checkpoint needs first (None: no check)
    step: int = 0
    tokens: int = 0
    _nonfinite: int = field(default=0, init=False)

    @property
    def rank(self) -> int:
        return dist.get_rank()

    def say(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)

    def resume(self) -> int:
        """Load the newest complete checkpoint, if any; returns the step it resumes from."""
        found = checkpoint.latest(self.run_dir)
        if found is None:
            return 0
        state = checkpoint.load(self.engine, found[1])
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.say(f"resumed from {found[1].name}: step {self.step}, {self.tokens} tokens seen")
        return self.step

    def _one_step(self) -> torch.Tensor:
        """One optimizer step of `accum` micro-steps; returns this rank's mean micro-step loss."""
        accum = self.spec.batch.accum
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float32)
        for m in range(accum):
            ids = torch.from_numpy(self.batches.micro_batch(self.step, m)).to(self.device, non_blocking=True)
            out = self.engine(input_ids=ids, labels=ids)
            self.engine.backward(out.loss)
            self.engine.step()  # DeepSpeed applies the optimizer only at the accumulation boundary
            loss_sum += out.loss.detach().float()
        return loss_sum / accum

    def _reduce(self, loss: torch.Tensor) -> tuple[float, bool, float | None]:
        """Mean loss over ranks, whether any rank was asked to stop, peak GPU memory of the busiest rank."""
        stats = torch.stack([loss, torch.tensor(float(self.stop.requested), device=self.device)])
        dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        mem = None
        if self.device.type == "cuda":
            peak = torch.tensor(torch.cuda.max_memory_allocated(self.device) / GiB, device=self.device)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            mem = round(peak.item(), 3)
        values = stats.tolist()
        return values[0] / dist.get_world_size(), values[1] > 0, mem

    def _loss_scale(self) -> float | None:
        if self.precision != "fp16":
            return None
        opt = self.engine.optimizer
        scale = getattr(opt, "cur_scale", None) or getattr(opt, "loss_scale", None)
        return float(scale) if scale is not None else None

    def _report(self, loss: float, dt: float, mem: float | None) -> None:
        plan = self.spec.batch
        step_tokens = plan.train * self.spec.seq_len  # packed blocks: every token is real
        self.tokens += step_tokens
        tokens_per_s = step_tokens / dt
        mfu = None
        if self.flops_per_token and self.peak_flops:
            mfu = round(tokens_per_s * self.flops_per_token / (plan.gpus * self.peak_flops), 4)
        lr = self.engine.get_lr()[0]
        if self.events is not None:
            self.events.emit(
                "step",
                step=self.step,
                epoch=self.batches.epoch_of(self.step - 1),
                loss=round(loss, 5) if math.isfinite(loss) else loss,
                lr=lr,
                samples_per_s=round(plan.train / dt, 3),
                tokens_per_s=round(tokens_per_s, 1),
                mfu=mfu,
                gpu_mem_gb=mem,
                loss_scale=self._loss_scale(),
                skipped=int(self.engine.skipped_steps),
                step_time_s=round(dt, 4),
                tokens=self.tokens,
            )
        self.say(
            f"step {self.step}/{self.total_steps} loss {loss:.4f} lr {lr:.3g} "
            f"{tokens_per_s:,.0f} tok/s" + (f" mfu {mfu:.1%}" if mfu is not None else "")
        )

    def _check_finite(self, loss: float) -> None:
        if math.isfinite(loss):
            self._nonfinite = 0
            return
        self._nonfinite += 1
        # fp16's loss scaler skips overflowing steps and recovers; a persistent NaN is divergence.
        if self.precision != "fp16" or self._nonfinite >= NONFINITE_LIMIT:
            raise Diverged(
                f"loss became {loss} at step {self.step}"
                + (f" ({self._nonfinite} steps in a row)" if self._nonfinite > 1 else "")
                + "; lower the learning rate or use bf16"
            )

    def _checkpoint(self) -> None:
        state = {"tokens": self.tokens, "epoch": self.batches.epoch_of(max(self.step - 1, 0))}
        path, seconds = checkpoint.save(
            self.engine, self.run_dir, self.step, state, self.spec.keep_checkpoints,
            needed=self.checkpoint_bytes, device=self.device,
        )  # fmt: skip
        if self.events is not None:
            rel = str(path.relative_to(self.run_dir))
            self.events.emit("checkpoint", step=self.step, path=rel, seconds=round(seconds, 3))
        self.say(f"checkpoint {path.name} written in {seconds:.2f}s")

    def run(self) -> int:
        """Train to total_steps; returns EXIT_OK, or EXIT_PREEMPTED after checkpointing on a stop request."""
        self.stop.install()
        every = self.spec.checkpoint_every
        saved_at = self.step
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            local_loss = self._one_step()
            loss, stop, mem = self._reduce(local_loss)  # .tolist() synchronizes: timing is honest
            self.step += 1
            self._report(loss, time.perf_counter() - t0, mem)
            self._check_finite(loss)
            if self.save_outputs and (stop or (every and self.step % every == 0)):
                self._checkpoint()
                saved_at = self.step
            if stop:
                self.say(f"stop requested: checkpointed at step {self.step}, exiting")
                return EXIT_PREEMPTED
        if self.save_outputs and saved_at != self.step:
            self._checkpoint()
        return EXIT_OK


def save_final_model(engine: Any, tokenizer: Any, run_dir: Path, zero_stage: int) -> Path:
    """The trained model in Hugging Face format, written by rank 0 (gathered first under ZeRO-3)."""
    out, tmp = run_dir / "model", run_dir / ".tmp-model"
    module = engine.module
    module.config.use_cache = True
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            if dist.get_rank() == 0:
                module.save_pretrained(tmp, safe_serialization=True)
    elif dist.get_rank() == 0:
        module.save_pretrained(tmp, safe_serialization=True)
    if dist.get_rank() == 0:
        tokenizer.save_pretrained(tmp)
        if out.exists():
            import shutil

            shutil.rmtree(out)
        os.replace(tmp, out)
    dist.barrier()
    return out
