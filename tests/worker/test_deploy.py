"""docker-compose.yml and the Dockerfile, checked by construction (Docker cannot run here): every
command names a real module or entry point, every TRAINBOX_ variable is a real setting, secrets are
required (`${VAR:?}`), and the worker reserves the GPUs."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from core.settings import Settings

REPO = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
OURS = ("migrate", "api", "worker")


def _resolve(dotted: str) -> Any:
    """Import `module` or `module:attr` (attr may be lazy, as api.app's `app` is)."""
    module, _, attr = dotted.partition(":")
    mod = importlib.import_module(module)
    return getattr(mod, attr) if attr else mod


def _check_python_code(code: str) -> None:
    """Every `from X import Y` in a `python -c` command resolves."""
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                assert hasattr(_resolve(node.module or ""), alias.name), f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                _resolve(alias.name)


def _check_command(argv: list[str]) -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    if argv[0] == "python" and argv[1] == "-m":
        spec = importlib.util.find_spec(argv[2])
        assert spec is not None, argv
        if spec.submodule_search_locations:  # a package: needs __main__
            assert importlib.util.find_spec(f"{argv[2]}.__main__") is not None, argv
    elif argv[0] == "python" and argv[1] == "-c":
        _check_python_code(argv[2])
    elif argv[0] == "uvicorn":
        assert _resolve(argv[1]) is not None
    elif argv[0] == "celery":
        app = _resolve(argv[argv.index("-A") + 1])
        assert hasattr(app, "app"), argv
    elif argv[0] in scripts:
        _resolve(scripts[argv[0]])
    else:
        pytest.fail(f"unknown program in compose command: {argv}")


@pytest.mark.parametrize("name", OURS)
def test_commands_name_real_entry_points(name: str) -> None:
    service = SERVICES[name]
    _check_command(service["command"])
    health = service.get("healthcheck", {}).get("test")
    if health and health[0] == "CMD":
        _check_command(health[1:])
    elif health and health[0] == "CMD-SHELL":
        first = health[1].split("|")[0].split()
        _check_command([w for w in first if not w.startswith("$")])


@pytest.mark.parametrize("name", OURS)
def test_trainbox_variables_are_real_settings(name: str) -> None:
    fields = {f"TRAINBOX_{f.upper()}" for f in Settings.model_fields}
    env = SERVICES[name]["environment"]
    names = {k for k in env if k.startswith("TRAINBOX_")}
    assert {"TRAINBOX_DATABASE_URL", "TRAINBOX_REDIS_URL"} <= names
    assert names <= fields, names - fields


def test_secrets_are_required_not_defaulted() -> None:
    text = (REPO / "docker-compose.yml").read_text()
    for secret in ("POSTGRES_PASSWORD", "REDIS_PASSWORD"):
        uses = re.findall(r"\$\{" + secret + r"([^}]*)\}", text)
        assert uses and all(u.startswith(":?") for u in uses), (secret, uses)
    assert "password" not in re.sub(r"\$\{[^}]*\}|PASSWORD|--requirepass|-a ", "", text).lower()


def test_worker_reserves_the_gpus_and_gets_time_to_checkpoint() -> None:
    worker = SERVICES["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] and d["driver"] == "nvidia" for d in devices)
    assert worker["stop_grace_period"]
    assert SERVICES["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert all("healthcheck" in SERVICES[s] for s in ("postgres", "redis", "api", "worker"))


def test_dockerfile_copies_every_package() -> None:
    text = (REPO / "Dockerfile").read_text()
    copied = {line.split()[1] for line in text.splitlines() if line.startswith("COPY ")}
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    for pattern in packages["include"]:
        assert pattern.rstrip("*") in copied, pattern
    for src in copied - {"README.md"}:  # README.md: pyproject's readme, written with the docs
        assert (REPO / src).exists(), src
