"""`trainbox service install`: run trainbox as a system service (systemd units, an environment file
with the TRAINBOX_ settings, a dedicated user). docs/OPERATIONS.md explains the layouts.

Two layouts:
- `embedded`: one unit runs `trainbox up` (SQLite, its own Redis, the API and a worker), supervised by
  `up` itself and restarted by systemd if `up` stops.
- `split`: `trainbox-api` (migrations, then uvicorn) and `trainbox-worker` (one per box), against a
  Postgres and a Redis named in the environment file. The API can run on any machine; every box runs
  a worker with its own TRAINBOX_BOX_NAME.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import typer

from client.cli_common import console, err_console

service_app = typer.Typer(help="Run trainbox as a system service (systemd).", no_args_is_help=True)

# How long systemd lets a stopping worker take: its jobs checkpoint on SIGTERM (the cancel grace,
# 30 s by default) and go back to the queue; a 1.3B checkpoint with optimizer states takes a while.
STOP_TIMEOUT_S = 300
MIGRATE = "from core.db import upgrade; upgrade()"


@dataclass(frozen=True)
class Unit:
    name: str
    text: str


def _trainbox() -> str:
    script = Path(sys.executable).parent / "trainbox"
    return str(script) if script.exists() else shutil.which("trainbox") or f"{sys.executable} -m client"


def _service(description: str, user: str, env_file: Path, workdir: Path, exec_start: str, **extra: str) -> str:
    lines = [
        "[Unit]",
        f"Description={description}",
        "After=network-online.target postgresql.service redis-server.service",
        "Wants=network-online.target",
        # Repeated fast failures stop the restarts (a broken config), and the unit shows as failed.
        "StartLimitIntervalSec=300",
        "StartLimitBurst=5",
        "",
        "[Service]",
        "Type=simple",
        f"User={user}",
        f"Group={user}",
        f"EnvironmentFile={env_file}",
        f"WorkingDirectory={workdir}",
        "UMask=0077",
        *(f"{k}={v}" for k, v in extra.items()),
        f"ExecStart={exec_start}",
        "Restart=on-failure",
        "RestartSec=5",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return "\n".join(lines)


def units(*, layout: str, user: str, data_dir: Path, env_file: Path, host: str, port: int) -> list[Unit]:
    """The unit files of a layout (`embedded` or `split`)."""
    if layout == "embedded":
        start = f"{_trainbox()} up --data-dir {data_dir} --host {host} --port {port}"
        # SIGTERM: `up` stops the worker first (its jobs checkpoint), then the API and Redis.
        text = _service(
            "trainbox (embedded: API, worker, Redis, SQLite)",
            user,
            env_file,
            data_dir,
            start,
            TimeoutStopSec=str(STOP_TIMEOUT_S + 30),
            KillMode="mixed",
        )
        return [Unit("trainbox.service", text)]
    api = _service(
        "trainbox API",
        user,
        env_file,
        data_dir,
        f"{sys.executable} -m uvicorn api.app:app --host {host} --port {port}",
        ExecStartPre=f'{sys.executable} -c "{MIGRATE}"',
        TimeoutStopSec="30",
    )
    # KillMode=mixed: SIGTERM to the worker alone, which checkpoints and requeues its jobs and stops
    # their ranks itself; whatever is left after the timeout gets SIGKILL.
    worker = _service(
        "trainbox worker (this box's GPUs)",
        user,
        env_file,
        data_dir,
        f"{sys.executable} -m worker",
        TimeoutStopSec=str(STOP_TIMEOUT_S),
        KillMode="mixed",
    )
    return [Unit("trainbox-api.service", api), Unit("trainbox-worker.service", worker)]


def env_file_text(*, layout: str, data_dir: Path) -> str:
    """The environment file's first contents: the settings each layout needs, the rest commented."""
    lines = [
        "# trainbox settings (TRAINBOX_*; see core/settings.py and docs/OPERATIONS.md). Mode 0600: it holds secrets.",
        f"TRAINBOX_DATA_DIR={data_dir}",
    ]
    if layout == "split":
        lines += [
            "TRAINBOX_DATABASE_URL=postgresql://trainbox:CHANGE-ME@127.0.0.1:5432/trainbox",
            "TRAINBOX_REDIS_URL=redis://:CHANGE-ME@127.0.0.1:6379/0",
            "# Each box's worker: a name unique among the boxes (default: the host name).",
            "#TRAINBOX_BOX_NAME=box1",
            "# Several boxes: runs on a volume every box and the API mount at the same path.",
            "#TRAINBOX_RUNS_ROOT=/srv/trainbox/runs",
        ]
    lines += [
        "#TRAINBOX_DATA_ROOT=/srv/datasets",
        "#TRAINBOX_MODEL_ROOT=/srv/models",
        "#TRAINBOX_MAX_GPUS_PER_USER=2",
        "#TRAINBOX_MAX_RUNTIME_S=604800",
        "",
    ]
    return "\n".join(lines)


def _ensure_user(user: str, home: Path) -> None:
    try:
        pwd.getpwnam(user)
        return
    except KeyError:
        pass
    nologin = shutil.which("nologin") or "/usr/sbin/nologin"
    subprocess.run(["useradd", "--system", "--home-dir", str(home), "--shell", nologin, user], check=True)
    console.print(f"created system user {user}")


@service_app.command("install")
def install(
    layout: str = typer.Option("embedded", "--layout", help="embedded (one unit: trainbox up) or split (API + worker)"),
    user: str = typer.Option("trainbox", "--user", help="the dedicated user the services run as"),
    data_dir: Path = typer.Option(Path("/var/lib/trainbox"), "--data-dir", help="database, runs, logs"),
    env_file: Path = typer.Option(Path("/etc/trainbox/trainbox.env"), "--env-file", help="TRAINBOX_ settings"),
    unit_dir: Path = typer.Option(Path("/etc/systemd/system"), "--unit-dir", help="where the unit files go"),
    host: str = typer.Option("127.0.0.1", "--host", help="the API's address (0.0.0.0 to serve the network)"),
    port: int = typer.Option(8000, "--port", help="the API's port"),
    print_only: bool = typer.Option(False, "--print", help="print the units and the environment file; change nothing"),
    create_user: bool = typer.Option(True, "--create-user/--no-create-user", help="create the user if missing"),
) -> None:
    """Write systemd units, an environment file (kept if it exists) and the user; then say how to start."""
    if layout not in ("embedded", "split"):
        err_console.print(f"error: --layout must be embedded or split, not {layout!r}")
        raise typer.Exit(2)
    made = units(layout=layout, user=user, data_dir=data_dir, env_file=env_file, host=host, port=port)
    env_text = env_file_text(layout=layout, data_dir=data_dir)
    if print_only:
        for unit in made:
            typer.echo(f"# {unit_dir / unit.name}\n{unit.text}")
        typer.echo(f"# {env_file}\n{env_text}")
        return
    if create_user:
        _ensure_user(user, data_dir)
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if create_user:
        shutil.chown(data_dir, user, user)
    env_file.parent.mkdir(parents=True, exist_ok=True)
    if not env_file.exists():
        fd = os.open(env_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(env_text)
        console.print(f"wrote {env_file} (edit it: {'database and Redis URLs' if layout == 'split' else 'optional'})")
    else:
        console.print(f"kept {env_file}")
    unit_dir.mkdir(parents=True, exist_ok=True)
    for unit in made:
        (unit_dir / unit.name).write_text(unit.text)
        console.print(f"wrote {unit_dir / unit.name}")
    names = " ".join(u.name for u in made)
    console.print(f"next: systemctl daemon-reload && systemctl enable --now {names}")


def register(app: typer.Typer) -> None:
    """Add `service install` to the CLI."""
    app.add_typer(service_app, name="service")
