"""Start a box's worker: `python -m worker [--loglevel LEVEL]`.

Builds the DeepSpeed ops its ranks need (worker/ops.py), registers the box (its GPUs via NVML, or
CPU slots), starts the periodic sweep, then runs a Celery worker on the box's own queue with one
thread per device: a job supervisor mostly waits on its child processes, and a shutdown signal
reaches every supervisor in one process.
"""

from __future__ import annotations

import argparse
import logging

from celery.signals import worker_shutting_down

from core import keys
from worker import runner
from worker.box import Sweeper, box_accelerator, box_devices, register
from worker.celery_app import app, broker_url
from worker.ops import OpsError, prepare_box_ops


@worker_shutting_down.connect
def _on_shutdown(**_: object) -> None:
    # Running jobs checkpoint (SIGTERM) and go back to the queue; Celery waits for their tasks.
    runner.shutting_down.set()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m worker", description="Run this box's trainbox worker.")
    parser.add_argument("--loglevel", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app.conf.broker_url = broker_url()
    devices = box_devices()
    # Before any job runs: the DeepSpeed ops ranks would otherwise compile (and lock) on first use.
    try:
        prepare_box_ops(box_accelerator(devices))
    except OpsError as e:
        raise SystemExit(f"worker start failed: {e}") from None
    box = register(devices)
    sweeper = Sweeper(box)
    sweeper.start()
    try:
        app.worker_main(
            [
                "worker",
                "--queues",
                keys.box_queue(box),
                "--pool",
                "threads",
                # One slot per device, plus one so a duplicate delivery never waits behind a run.
                "--concurrency",
                str(len(devices) + 1),
                "--hostname",
                f"trainbox@{box}",
                "--loglevel",
                args.loglevel.upper(),
                "--without-gossip",
                "--without-mingle",
            ]
        )
    finally:
        sweeper.stop()


if __name__ == "__main__":
    main()
