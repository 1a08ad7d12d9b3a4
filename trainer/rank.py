"""One rank's program: spec -> distributed init -> data -> model -> engine -> loop -> save.

Started by `trainer.launch` with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set. Rank 0 writes
events for people; every rank writes its own error file if it fails, for the launcher.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from trainer import tokencache
from trainer.checkpoint import DiskFull, out_of_space
from trainer.events import (
    EXIT_FAILED,
    EXIT_INVALID,
    EXIT_OK,
    ErrorType,
    EventWriter,
    reserve_rank_error,
    write_rank_error,
)
from trainer.formats import trains_all
from trainer.loop import Diverged, GiB, Loop, StopFlag, save_final_model
from trainer.paths import SpecError, inspect_data, resolve_model
from trainer.spec import JobSpec


def _setup_device() -> tuple[Any, bool]:
    import torch

    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local), True
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    return torch.device("cpu"), False


def train(args: Any, stop: StopFlag, events: EventWriter | None) -> int:
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from trainer import checkpoint
    from trainer import model as models
    from trainer.data import DataOptions, PackedBatches, cache_key, prepare
    from trainer.dsconfig import build_ds_config, optimizer_summary, resolve_precision, total_steps
    from trainer.evaluate import EvalBlocks
    from trainer.hardware import peak_flops
    from trainer.presets import flops_per_token

    run_dir = Path(args.run_dir)
    spec = JobSpec.model_validate_json(Path(args.spec).read_text())
    device, on_gpu = _setup_device()
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != spec.gpus:
        raise SpecError(f"the spec asks for {spec.gpus} GPUs but {world} ranks were started", "gpus")
    torch.manual_seed(spec.seed)  # identical initial weights on every rank

    source = resolve_model(spec.model, Path(args.model_root))
    # The whole file, every record, before the first step: a bad line fails the job as `invalid`.
    info, val_info = inspect_data(spec, Path(args.data_root))
    tokenizer = models.load_tokenizer(source)
    enc = models.encoder(tokenizer, info.data_format)
    opts = DataOptions(
        format=info.data_format,
        text_field=spec.dataset.text_field,
        val_text_field=spec.validation.text_field if spec.validation else spec.dataset.text_field,
        train_all=trains_all(info.data_format, spec.dataset.train_on),
        overlong=spec.dataset.overlong,
        seq_len=spec.seq_len,
        split=spec.validation_split,
        seed=spec.seed,
        tokenizer=models.tokenizer_id(source, tokenizer),
        template=models.template_id(tokenizer),
    )
    cache_dir, cache_max = tokencache.location(Path(args.data_root), run_dir, args.token_cache_bytes)
    key = cache_key(info, val_info, opts)
    if rank == 0:
        checkpoint.remove_partial(run_dir)
        t0 = time.perf_counter()
        built = prepare(info, val_info, opts, enc, cache_dir, build=True, key=key, max_bytes=cache_max).built
        print(f"data: {'tokenized' if built else 'cached'} data-{key} in {time.perf_counter() - t0:.2f}s", flush=True)
    dist.barrier()  # rank 0 tokenized; the others map the same files
    data = prepare(info, val_info, opts, enc, cache_dir, build=False, key=key)
    batches = PackedBatches(data.train[0], spec.seq_len, spec.batch, rank, spec.seed, mask=data.train[1])
    steps = total_steps(spec, batches.steps_per_epoch)
    evals = None
    if data.val is not None:
        evals = EvalBlocks(data.val[0], data.val[1], spec.seq_len, spec.batch.micro, rank, world)
    elif spec.has_validation:
        raise SpecError("validation data has no usable example (all longer than seq_len?)", "validation")

    bf16_ok = bool(get_accelerator().is_bf16_supported())
    precision, notes = resolve_precision(spec, on_gpu=on_gpu, bf16_supported=bf16_ok)
    ds_config = build_ds_config(spec, precision=precision, steps=steps)
    model = models.build_model(source, ds_config=ds_config, gradient_checkpointing=spec.gradient_checkpointing)
    opt = optimizer_summary(spec)
    optimizer_cls = torch.optim.AdamW if opt["type"] == "AdamW" else torch.optim.Adam
    optimizer = optimizer_cls(
        models.param_groups(model, opt["weight_decay"]),
        lr=opt["lr"],
        betas=tuple(opt["betas"]),
        eps=opt["eps"],
        fused=on_gpu or None,  # one kernel for all parameters on GPU
    )
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)

    cfg = model.config
    n_params = models.count_params(model)
    fpt = None
    if all(hasattr(cfg, k) for k in ("hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size")):
        fpt = flops_per_token(cfg.to_dict(), spec.seq_len)
    device_name = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    stage = ds_config["zero_optimization"]["stage"]
    ckpt_bytes = checkpoint.estimate_bytes(n_params, precision, stage, world)
    loop = Loop(
        spec=spec,
        run_dir=run_dir,
        engine=engine,
        batches=batches,
        device=device,
        events=events,
        stop=stop,
        total_steps=steps,
        flops_per_token=fpt,
        peak_flops=peak_flops(device_name) if on_gpu else None,
        precision=precision,
        save_outputs=not args.no_save,
        # TRAINBOX_DISK_CHECK=off: a filesystem that misreports its free space (some network mounts).
        checkpoint_bytes=None if os.environ.get("TRAINBOX_DISK_CHECK") == "off" else ckpt_bytes,
        evals=evals,
        eval_every=(spec.eval_every or max(1, steps // 10)) if evals is not None else 0,
    )
    resumed = loop.resume()
    for note in notes:
        loop.say(f"note: {note}")
    if events is not None:
        plan = spec.batch
        events.emit(
            "start",
            world_size=world,
            micro_batch=plan.micro,
            grad_accum=plan.accum,
            train_batch_size=plan.train,
            total_steps=steps,
            steps_per_epoch=batches.steps_per_epoch,
            resumed_from_step=resumed,
            precision=precision,
            notes=notes,
            n_params=n_params,
            device=device_name,
            seq_len=spec.seq_len,
            dataset_tokens=int(len(batches.tokens)),
            data=data.stats | {"cache": str(cache_dir / f"data-{key}")},
            eval_every=loop.eval_every,
            # What actually runs: `fused` says whether AdamW is one kernel for all parameters (GPU).
            optimizer=opt | {"fused": bool(optimizer.defaults.get("fused"))},
            deepspeed_config=ds_config,
            checkpoint_estimate_bytes=ckpt_bytes,
        )
    code = loop.run()
    if code != EXIT_OK:
        if events is not None:
            events.emit("end", status="preempted", step=loop.step, error=None)
        return code
    model_path = None
    model_step = loop.load_best() or loop.step
    if not args.no_save:
        model_path = save_final_model(engine, tokenizer, run_dir, stage)
    if events is not None:
        events.emit(
            "end",
            status="succeeded",
            step=loop.step,
            error=None,
            model_path=str(model_path.relative_to(run_dir)) if model_path else None,
            model_step=model_step,
        )
    return EXIT_OK


_CPU_OOM = re.compile(r"DefaultCPUAllocator: can't allocate memory: you tried to allocate (\d+) bytes")


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, MemoryError | torch.OutOfMemoryError) or bool(_CPU_OOM.search(str(exc)))


def _oom_message(exc: BaseException) -> str:
    """What ran out, and at what figure: the failed request and what was already held."""
    import torch

    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, torch.OutOfMemoryError) and torch.cuda.is_available():
        dev = torch.cuda.current_device()
        peak = torch.cuda.max_memory_allocated(dev) / GiB
        total = torch.cuda.get_device_properties(dev).total_memory / GiB
        return f"out of GPU memory at {peak:.2f} GiB allocated of {total:.1f} GiB: {first}"
    held = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB -> GiB
    m = _CPU_OOM.search(str(exc))
    asked = f"could not allocate {int(m.group(1)) / 1024**2:.1f} MiB" if m else "allocation failed"
    return f"out of host memory: {asked} with {held:.2f} GiB resident in this rank"


def main(args: Any) -> int:
    run_dir = Path(args.run_dir)
    rank = int(os.environ.get("RANK", "0"))
    events = EventWriter(run_dir) if rank == 0 else None
    reserve_rank_error(run_dir, rank)
    stop = StopFlag()
    # Until the loop can checkpoint there is nothing to save: a stop request ends the rank at once
    # (the default action), even inside a JIT build, a lock wait or a rendezvous, where a Python
    # handler would not run until C code returned. The loop installs the checkpointing handler.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)

    def fail(error_type: str, message: str, code: int) -> int:
        # The launcher writes the failed `end` event: it knows which rank failed first (a rank whose
        # peer died sees only a broken connection, which is not the cause worth reporting).
        try:
            write_rank_error(run_dir, rank, error_type, message)
        except OSError as e:  # a disk with no byte left: the message still reaches train.log
            print(f"could not write this rank's error file ({e}): {error_type}: {message}", file=sys.stderr)
        return code

    try:
        code = train(args, stop, events)
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        return code
    except SpecError as e:
        print(f"invalid: {e}", file=sys.stderr, flush=True)
        return fail(ErrorType.INVALID, str(e), EXIT_INVALID)
    except Diverged as e:
        print(f"diverged: {e}", file=sys.stderr, flush=True)
        return fail(ErrorType.TRAIN_ERROR, str(e), EXIT_FAILED)
    except DiskFull as e:
        print(f"disk: {e}", file=sys.stderr, flush=True)
        return fail(ErrorType.DISK, str(e), EXIT_FAILED)
    except Exception as e:  # reported as the job's error, never swallowed
        traceback.print_exc()
        if _is_oom(e):
            return fail(ErrorType.OOM, _oom_message(e), EXIT_FAILED)
        if out_of_space(e):  # the token cache, the final model: anything written once the disk is full
            return fail(ErrorType.DISK, f"out of disk space under {run_dir}: {type(e).__name__}: {e}", EXIT_FAILED)
        return fail(ErrorType.TRAIN_ERROR, f"{type(e).__name__}: {e}", EXIT_FAILED)
