"""`trainbox service install`: systemd units that systemd accepts, commands that exist, settings that
are real, an environment file that stays private and is never overwritten."""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from core.settings import Settings
from tests.client.conftest import trainbox_argv
from tests.worker.test_deploy import _check_python_code, _resolve


def _install(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    argv = trainbox_argv() + [
        "service",
        "install",
        "--unit-dir",
        str(tmp_path / "units"),
        "--env-file",
        str(tmp_path / "etc" / "trainbox.env"),
        "--data-dir",
        str(tmp_path / "data"),
        "--no-create-user",
        *args,
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def _parse(path: Path) -> configparser.ConfigParser:
    return _parse_text(path.read_text())


@pytest.mark.parametrize(
    ("layout", "names"),
    [
        ("embedded", ["trainbox.service"]),
        ("split", ["trainbox-api.service", "trainbox-worker.service"]),
    ],
)
def test_units_are_valid_run_real_commands_and_restart(tmp_path: Path, layout: str, names: list[str]) -> None:
    done = _install(tmp_path, "--layout", layout)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "units").iterdir()) == sorted(names)
    for name in names:
        path = tmp_path / "units" / name
        unit = _parse(path)
        service = unit["Service"]
        assert service["User"] == "trainbox" and service["Restart"] == "on-failure"
        assert service["EnvironmentFile"] == str(tmp_path / "etc" / "trainbox.env")
        assert service["UMask"] == "0077"
        assert int(unit["Unit"]["StartLimitBurst"]) >= 1
        for key in ("ExecStart", "ExecStartPre"):
            if key in service:
                argv = shlex.split(service[key])
                assert Path(argv[0]).is_absolute() and Path(argv[0]).exists(), argv
                if argv[1:2] == ["-m"]:
                    _resolve(argv[3] if argv[2] == "uvicorn" else argv[2])
                elif argv[1:2] == ["-c"]:
                    _check_python_code(argv[2])
        if "worker" in name or layout == "embedded":
            # The worker's jobs checkpoint on SIGTERM: systemd sends it to the main process only and waits.
            assert service["KillMode"] == "mixed" and int(service["TimeoutStopSec"]) >= 120
    if shutil.which("systemd-analyze"):
        verify = subprocess.run(
            ["systemd-analyze", "verify", *[str(tmp_path / "units" / n) for n in names]], capture_output=True, text=True
        )
        assert verify.returncode == 0, verify.stdout + verify.stderr


@pytest.mark.parametrize("layout", ["embedded", "split"])
def test_the_environment_file_names_real_settings_is_private_and_is_kept(tmp_path: Path, layout: str) -> None:
    assert _install(tmp_path, "--layout", layout).returncode == 0
    env = tmp_path / "etc" / "trainbox.env"
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    names = re.findall(r"^#?(TRAINBOX_[A-Z_]+)=", env.read_text(), flags=re.M)
    assert "TRAINBOX_DATA_DIR" in names
    fields = {f"TRAINBOX_{f.upper()}" for f in Settings.model_fields}
    assert set(names) <= fields, set(names) - fields
    # A second install keeps what the admin wrote.
    env.write_text("TRAINBOX_DATA_DIR=/srv/mine\n")
    again = _install(tmp_path, "--layout", layout)
    assert again.returncode == 0 and "kept" in again.stdout
    assert env.read_text() == "TRAINBOX_DATA_DIR=/srv/mine\n"


def test_print_changes_nothing_and_a_bad_layout_is_refused(tmp_path: Path) -> None:
    printed = _install(tmp_path, "--print")
    assert printed.returncode == 0 and "[Service]" in printed.stdout and "TRAINBOX_DATA_DIR=" in printed.stdout
    assert not (tmp_path / "units").exists() and not (tmp_path / "etc").exists()
    refused = _install(tmp_path, "--layout", "kubernetes")
    assert refused.returncode == 2 and "embedded or split" in refused.stderr


def test_the_units_and_docker_compose_run_the_same_commands_with_the_same_stop_time() -> None:
    from client.cli_service import MIGRATE, STOP_TIMEOUT_S, units
    from tests.worker.test_deploy import SERVICES

    split = {
        u.name: _parse_text(u.text)
        for u in units(layout="split", user="t", data_dir=Path("/d"), env_file=Path("/e"), host="0.0.0.0", port=8000)
    }
    api, worker = split["trainbox-api.service"]["Service"], split["trainbox-worker.service"]["Service"]
    assert SERVICES["migrate"]["command"] == ["python", "-c", MIGRATE]
    assert MIGRATE in api["ExecStartPre"]
    assert shlex.split(api["ExecStart"])[1:4] == ["-m", *SERVICES["api"]["command"][:2]]
    assert shlex.split(worker["ExecStart"])[1:] == SERVICES["worker"]["command"][1:]
    assert SERVICES["worker"]["stop_grace_period"] == f"{STOP_TIMEOUT_S}s" == f"{worker['TimeoutStopSec']}s"


def _parse_text(text: str) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(text)
    return unit
