"""The supervisor with a fake trainer: outcomes by exit code and end event, cancel, deadline, and
that no process of the job survives (psutil)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil

from tests.helpers import lock_holder
from worker.supervisor import Launch, Stop, session_members, supervise, trainer_command, trainer_env


def _sessions_of(run_dir: Path) -> list[psutil.Process]:
    """Live processes whose command line names this run dir (the fake trainer and its children)."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if str(run_dir) in " ".join(p.info["cmdline"] or []) and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            continue
    return out


def test_success_relays_through_tick_and_reports_end(make_launch):
    ticks = []
    outcome = supervise(make_launch("--steps", "5"), lambda: ticks.append(1) and None)
    assert outcome.kind == "succeeded" and outcome.exit_code == 0 and outcome.error is None
    assert outcome.end_event["status"] == "succeeded"
    assert ticks, "the tick runs while the trainer runs"
    assert (make_launch().run_dir / "spec.json").exists()


def test_invalid_exit_code_fails_with_type_and_log_tail(make_launch):
    outcome = supervise(make_launch("--steps", "2", "--exit", "2"))
    assert outcome.kind == "failed"
    assert outcome.error["type"] == "invalid"
    assert "RuntimeError: boom" in outcome.error["log_tail"]


def test_end_event_error_type_is_used(make_launch):
    outcome = supervise(make_launch("--steps", "2", "--exit", "1", "--error-type", "oom"))
    assert outcome.error["type"] == "oom" and outcome.error["message"] == "boom"


def test_unknown_failure_is_a_train_error(make_launch):
    outcome = supervise(make_launch("--steps", "1", "--exit", "3"))
    assert outcome.error["type"] == "train_error"
    assert "code 3" in outcome.error["message"] and outcome.error["exit_code"] == 3


def test_launch_error_when_the_program_cannot_start(make_launch, tmp_path):
    outcome = supervise(make_launch(command=[str(tmp_path / "no-such-program")]))
    assert outcome.kind == "failed" and outcome.error["type"] == "launch_error"


def test_cancel_sigterms_the_group_and_leaves_nothing(make_launch):
    launch = make_launch("--steps", "100000", "--step-s", "0.05")
    seen = {"steps": 0}

    def tick():
        events = launch.run_dir / "events.jsonl"
        seen["steps"] = events.read_text().count('"step"') if events.exists() else 0
        return Stop.CANCEL if seen["steps"] >= 3 else None

    outcome = supervise(launch, tick)
    assert outcome.kind == "cancelled" and outcome.exit_code == 75
    assert outcome.end_event["status"] == "preempted"
    assert _sessions_of(launch.run_dir) == []


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace(make_launch):
    launch = make_launch(
        "--steps", "100000", "--step-s", "0.05", "--stubborn-child", "--ignore-term", cancel_grace_s=0.5
    )
    started = time.monotonic()
    holder: dict[str, int] = {}

    def tick():
        events = launch.run_dir / "events.jsonl"
        if events.exists() and '"step"' in events.read_text():
            if "sid" not in holder:
                holder["sid"] = max(os.getsid(p.pid) for p in _sessions_of(launch.run_dir))
            return Stop.CANCEL
        return None

    outcome = supervise(launch, tick)
    assert outcome.kind == "cancelled"
    assert time.monotonic() - started < 30
    assert session_members(holder["sid"]) == []
    assert _sessions_of(launch.run_dir) == []


def test_survivors_of_a_finished_trainer_are_killed(make_launch):
    launch = make_launch("--steps", "1", "--stubborn-child")
    outcome = supervise(launch)
    assert outcome.kind == "succeeded"
    assert outcome.survivors_killed >= 1
    assert _sessions_of(launch.run_dir) == []


def test_deadline_stops_with_timeout(make_launch):
    launch = make_launch("--steps", "100000", "--step-s", "0.05", max_runtime_s=1.0)
    outcome = supervise(launch)
    assert outcome.kind == "failed" and outcome.error["type"] == "timeout"
    events = (launch.run_dir / "events.jsonl").read_text()
    assert '"checkpoint"' in events, "SIGTERM gave the trainer its chance to checkpoint"


def test_shutdown_preempts(make_launch):
    outcome = supervise(make_launch("--steps", "100000", "--step-s", "0.05"), lambda: Stop.SHUTDOWN)
    assert outcome.kind == "preempted"


def test_env_shows_only_the_assigned_devices_and_no_settings(make_launch):
    base = {"PATH": "/bin", "TRAINBOX_DATABASE_URL": "postgresql://secret", "CUDA_VISIBLE_DEVICES": "0,1,2"}
    gpu = trainer_env(make_launch(accelerator="cuda", devices=[2, 0]), base)
    assert gpu["CUDA_VISIBLE_DEVICES"] == "2,0" and "DS_ACCELERATOR" not in gpu
    assert gpu["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID", "the same numbering as NVML, which registered them"
    assert not any(k.startswith("TRAINBOX_") for k in gpu)
    cpu = trainer_env(make_launch(cpu_threads=3), base)
    assert cpu["DS_ACCELERATOR"] == "cpu" and cpu["CUDA_VISIBLE_DEVICES"] == "" and cpu["OMP_NUM_THREADS"] == "3"


def test_trainer_command_follows_the_contract(tmp_path):
    launch = Launch(
        job_id="j",
        attempt=1,
        spec={},
        run_dir=tmp_path / "r",
        devices=[0],
        accelerator="cpu",
        model_root=tmp_path / "m",
        data_root=tmp_path / "d",
    )
    argv = trainer_command(launch)
    assert argv[1:4] == ["-m", "trainer", "run"]
    assert argv[argv.index("--spec") + 1] == str(tmp_path / "r" / "spec.json")
    assert "--master-port" not in argv, "the launcher serves the rendezvous on a port the OS assigns"
    assert {"--run-dir", "--model-root", "--data-root"} <= set(argv)


def test_a_run_that_finished_before_the_stop_took_effect_succeeded(tmp_path):
    from worker.supervisor import classify

    assert classify(0, {"type": "end", "status": "succeeded"}, Stop.CANCEL, tmp_path).kind == "succeeded"
    assert classify(0, None, Stop.TIMEOUT, tmp_path).kind == "succeeded"
    assert classify(0, None, Stop.LOST, tmp_path).kind == "lost", "a fenced attempt writes nothing"
    assert classify(75, None, Stop.CANCEL, tmp_path).kind == "cancelled"
    assert classify(-9, None, None, tmp_path).error["message"] == "the trainer was killed by signal SIGKILL"


def test_a_trainer_that_never_starts_fails_as_launch_error_and_leaves_nothing(make_launch):
    launch = make_launch("--start-after", "3600", start_timeout_s=1.0, cancel_grace_s=5.0)
    began = time.monotonic()
    outcome = supervise(launch)
    assert time.monotonic() - began < 10, "SIGTERM ends a trainer in start-up at once, no grace needed"
    assert outcome.kind == "failed" and outcome.error["type"] == "launch_error"
    message = outcome.error["message"]
    assert message.startswith("no rank started within 1 s; last log lines: "), message
    assert "waiting on something before start" in message
    assert _sessions_of(launch.run_dir) == []


def test_a_slow_start_within_the_timeout_is_not_stopped(make_launch):
    outcome = supervise(make_launch("--start-after", "1", "--steps", "3", start_timeout_s=20.0))
    assert outcome.kind == "succeeded"


def test_a_stale_build_lock_is_removed_before_launch_and_a_held_one_is_named(make_launch, tmp_path, caplog):
    ext = tmp_path / "ext"
    (ext / "stale_op").mkdir(parents=True)
    (ext / "stale_op" / "lock").touch()  # what a SIGKILLed builder leaves
    (ext / "busy_op").mkdir()
    with lock_holder(ext / "busy_op" / "lock") as holder:  # a live builder holds its lock open until it removes it
        with caplog.at_level("WARNING", logger="worker.ops"):
            outcome = supervise(make_launch("--start-after", "3600", extensions_dir=ext, start_timeout_s=2.0))
        assert not (ext / "stale_op" / "lock").exists()
        assert f"removed a stale DeepSpeed build lock {ext / 'stale_op' / 'lock'}" in caplog.text
        assert (ext / "busy_op" / "lock").exists(), "a live builder's lock is left alone"
        assert outcome.error["type"] == "launch_error"
        assert f"{ext / 'busy_op' / 'lock'} (held by pid {holder.pid})" in outcome.error["message"]
