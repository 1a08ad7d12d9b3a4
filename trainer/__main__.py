"""`python -m trainer run|bench`: the training program, runnable on its own."""

from __future__ import annotations

import argparse
import os
import sys

from trainer.tokencache import DEFAULT_TOKEN_CACHE_BYTES


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", required=True, help="the JobSpec as JSON")
    p.add_argument("--run-dir", required=True, help="where events, logs, checkpoints and the model go")
    p.add_argument("--model-root", default=".", help="model directories are looked up under this root")
    p.add_argument("--data-root", default=".", help="dataset paths are looked up under this root")
    p.add_argument("--no-save", action="store_true", help="no checkpoints and no final model (benchmarks)")
    p.add_argument(
        "--token-cache-bytes",
        type=int,
        default=DEFAULT_TOKEN_CACHE_BYTES,
        help="bound of the tokenized-data cache under the data root (shared by jobs); 0: cache in the run dir",
    )


def main(argv: list[str] | None = None) -> int:
    from trainer.launch import STOP_GRACE_S

    parser = argparse.ArgumentParser(prog="python -m trainer")
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="train: start one process per rank and supervise them")
    _common(run)
    run.add_argument(
        "--stop-grace",
        type=float,
        default=STOP_GRACE_S,
        help="seconds ranks get to checkpoint and exit after SIGTERM before SIGKILL",
    )
    rank = sub.add_parser("rank", help="one rank (started by `run`)")
    _common(rank)
    bench = sub.add_parser("bench", help="throughput and memory over batch sizes, warm-up excluded")
    from trainer.bench import add_arguments

    add_arguments(bench)
    args = parser.parse_args(argv)
    if args.cmd == "run":
        from trainer.launch import Launcher

        return Launcher(args).run()
    if args.cmd == "rank":
        from trainer.rank import main as rank_main

        code = rank_main(args)
        # Leave without running C++ static destructors: communication threads still joinable at
        # interpreter teardown can abort the process ("terminate called without an active
        # exception") after the work is done, turning a finished run into a failed one.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    from trainer.bench import main as bench_main

    return bench_main(args)


if __name__ == "__main__":
    sys.exit(main())
