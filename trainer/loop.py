"""The training loop of one rank: engine -> resume -> steps -> checkpoints -> final model."""

from __future__ import annotations

import json
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
from trainer.evaluate import EvalBlocks, evaluate, loss_sum, perplexity
from trainer.events import CHECKPOINTS_DIR, EXIT_OK, EXIT_PREEMPTED, MODEL_DIR, EventWriter
from trainer.spec import JobSpec

GiB = 1024**3
BEST_FILE = "best.json"  # under checkpoints/: the step and eval loss of the best checkpoint (keep_best)
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
    evals: EvalBlocks | None = None  # validation blocks, when the spec has validation data
    eval_every: int = 0  # steps between evaluations (0: none); one more at the end
    step: int = 0
    tokens: int = 0  # real tokens processed (inputs), all ranks
    trained_tokens: int = 0  # of which the loss was computed on (unmasked targets)
    best: dict[str, Any] | None = None  # {"step", "eval_loss"} of the best evaluation (keep_best)
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
        self.trained_tokens = int(state.get("trained_tokens", 0))
        best_file = self.run_dir / CHECKPOINTS_DIR / BEST_FILE
        if self.spec.keep_best and best_file.is_file():
            self.best = json.loads(best_file.read_text())
        self.say(f"resumed from {found[1].name}: step {self.step}, {self.tokens} tokens seen")
        return self.step

    def _one_step(self, trained: int) -> torch.Tensor:
        """One optimizer step of `accum` micro-steps; returns this rank's summed token loss.

        The loss is the mean over the global batch's trained tokens (`trained`, known to every rank):
        each micro-step's sum is divided by it and multiplied back by what DeepSpeed divides by
        (accumulation steps, and ranks when it averages gradients), so masked batches with uneven
        counts weight every trained token alike."""
        accum = self.spec.batch.accum
        scale = accum * dist.get_world_size() / max(trained, 1)
        total = torch.zeros((), device=self.device, dtype=torch.float32)
        for m in range(accum):
            ids = torch.from_numpy(self.batches.micro_batch(self.step, m)).to(self.device, non_blocking=True)
            labels = torch.from_numpy(self.batches.micro_labels(self.step, m)).to(self.device, non_blocking=True)
            summed = loss_sum(self.engine(input_ids=ids).logits, labels)
            self.engine.backward(summed * scale)
            self.engine.step()  # DeepSpeed applies the optimizer only at the accumulation boundary
            total += summed.detach().float()
        return total

    def _reduce(self, loss: torch.Tensor, trained: int) -> tuple[float, bool, float | None]:
        """Mean loss per trained token, whether any rank was asked to stop, peak GPU memory of the busiest rank."""
        stats = torch.stack([loss, torch.tensor(float(self.stop.requested), device=self.device)])
        dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        mem = None
        if self.device.type == "cuda":
            peak = torch.tensor(torch.cuda.max_memory_allocated(self.device) / GiB, device=self.device)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            mem = round(peak.item(), 3)
        values = stats.tolist()
        return values[0] / max(trained, 1), values[1] > 0, mem

    def _loss_scale(self) -> float | None:
        if self.precision != "fp16":
            return None
        opt = self.engine.optimizer
        scale = getattr(opt, "cur_scale", None) or getattr(opt, "loss_scale", None)
        return float(scale) if scale is not None else None

    def _report(self, loss: float, dt: float, mem: float | None, step_tokens: int, trained: int) -> None:
        plan = self.spec.batch
        self.tokens += step_tokens  # real tokens: padding between packed examples is not counted
        self.trained_tokens += trained
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
                trained_tokens_per_s=round(trained / dt, 1),
                trained_tokens=self.trained_tokens,
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
        state = {
            "tokens": self.tokens,
            "trained_tokens": self.trained_tokens,
            "epoch": self.batches.epoch_of(max(self.step - 1, 0)),
        }
        path, seconds = checkpoint.save(
            self.engine,
            self.run_dir,
            self.step,
            state,
            self.spec.keep_checkpoints,
            needed=self.checkpoint_bytes,
            device=self.device,
            also_keep=self.best["step"] if self.best else None,
        )
        if self.events is not None:
            rel = str(path.relative_to(self.run_dir))
            self.events.emit("checkpoint", step=self.step, path=rel, seconds=round(seconds, 3))
        self.say(f"checkpoint {path.name} written in {seconds:.2f}s")

    def _evaluate(self) -> bool:
        """Eval loss on the validation blocks (an `eval` event); True when it is the best so far (keep_best)."""
        assert self.evals is not None
        t0 = time.perf_counter()
        loss, count = evaluate(self.engine, self.evals, self.device)
        if self.events is not None:
            self.events.emit(
                "eval",
                step=self.step,
                eval_loss=round(loss, 5) if math.isfinite(loss) else loss,
                perplexity=perplexity(loss),
                tokens=count,
                seconds=round(time.perf_counter() - t0, 3),
            )
        self.say(f"eval at step {self.step}: loss {loss:.4f} over {count} tokens")
        if not (self.spec.keep_best and math.isfinite(loss)):
            return False
        if self.best is not None and loss >= self.best["eval_loss"]:
            return False
        self.best = {"step": self.step, "eval_loss": loss}
        return True

    def _mark_best(self) -> None:
        """After the best checkpoint is sealed: remember it (a resumed run keeps protecting it)."""
        if self.rank == 0 and self.best is not None:
            path = self.run_dir / CHECKPOINTS_DIR / BEST_FILE
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.best))
            os.replace(tmp, path)

    def run(self) -> int:
        """Train to total_steps; returns EXIT_OK, or EXIT_PREEMPTED after checkpointing on a stop request."""
        self.stop.install()
        every = self.spec.checkpoint_every
        saved_at = self.step
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            step_tokens, trained = self.batches.step_tokens(self.step)
            local_loss = self._one_step(trained)
            loss, stop, mem = self._reduce(local_loss, trained)  # .tolist() synchronizes: timing is honest
            self.step += 1
            self._report(loss, time.perf_counter() - t0, mem, step_tokens, trained)
            self._check_finite(loss)
            best = False
            if self.evals is not None and (
                self.step == self.total_steps or (self.eval_every and self.step % self.eval_every == 0)
            ):
                best = self._evaluate()
            if self.save_outputs and (stop or best or (every and self.step % every == 0)):
                self._checkpoint()
                saved_at = self.step
                if best:
                    self._mark_best()
            if stop:
                self.say(f"stop requested: checkpointed at step {self.step}, exiting")
                return EXIT_PREEMPTED
        if self.save_outputs and saved_at != self.step:
            self._checkpoint()
        return EXIT_OK

    def load_best(self) -> int | None:
        """keep_best: put the best checkpoint's weights into the engine for the export; returns its step."""
        if not (self.spec.keep_best and self.save_outputs and self.best is not None):
            return None
        step = int(self.best["step"])
        if step != self.step:
            path = self.run_dir / CHECKPOINTS_DIR / f"step-{step}"
            self.engine.load_checkpoint(
                str(path.parent), tag=path.name, load_optimizer_states=False, load_lr_scheduler_states=False
            )
            self.say(f"keep_best: exporting step {step} (eval loss {self.best['eval_loss']:.4f})")
        return step


def save_final_model(engine: Any, tokenizer: Any, run_dir: Path, zero_stage: int) -> Path:
    """The trained model in Hugging Face format, written by rank 0 (gathered first under ZeRO-3)."""
    out, tmp = run_dir / MODEL_DIR, run_dir / ".tmp-model"
    module = engine.module
    module.config.use_cache = True
    if module.generation_config.eos_token_id is None:  # presets: generate() stops after an answer's EOS
        module.config.eos_token_id = module.generation_config.eos_token_id = tokenizer.eos_token_id
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
