"""The DeepSpeed ops a rank compiles on first use, built ahead of every job: `python -m trainer.ops`.

DeepSpeed JIT-compiles some C++ ops (torch.utils.cpp_extension) into TORCH_EXTENSIONS_DIR/<op>,
holding a lock file there while it builds; every later load also takes that lock for a moment. A
rank killed inside the build leaves the lock behind and every later rank waits on it forever. Built
once before any job runs (the worker does it at start, in a cache it owns), a rank only loads them.

What the trainer's path compiles, per accelerator:
- cpu (DS_ACCELERATOR=cpu, gloo): `deepspeed_shm_comm`, which deepspeed.comm's TorchBackend loads
  in init_distributed on every rank. The optimizer is torch's AdamW, so no CPU Adam/Adagrad/Lion.
- cuda: nothing. torch's fused AdamW and NCCL need no DeepSpeed op, and the CUDA accelerator has
  no shm comm builder. (Only the opt-in `zero_quantized_weights/gradients` would compile
  DeepSpeed's quantizer, at first use, in the same cache: see docs/TRAINER.md.)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

OPS: dict[str, tuple[str, ...]] = {
    "cpu": ("ShareMemCommBuilder",),
    "cuda": (),
}


def build(accelerator: str) -> int:
    """Build (or load, when built) each op `accelerator` ranks need; one line per op; 1 if one failed."""
    if accelerator == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"  # read once, when DeepSpeed first picks its accelerator
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    failed = 0
    for name in OPS[accelerator]:
        builder = get_accelerator().create_op_builder(name)
        if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
            print(f"{name}: DeepSpeed does not use it here; skipped", flush=True)
            continue
        t0 = time.perf_counter()
        try:
            builder.load(verbose=False)
        except Exception as e:  # the compiler's output is above; the worker reports the failure
            print(f"{builder.NAME}: build failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            failed += 1
            continue
        print(f"{builder.NAME}: ready in {time.perf_counter() - t0:.1f}s", flush=True)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.ops", description=__doc__.splitlines()[0])
    parser.add_argument("--accelerator", choices=sorted(OPS), required=True)
    return build(parser.parse_args(argv).accelerator)


if __name__ == "__main__":
    sys.exit(main())
