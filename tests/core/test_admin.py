"""`trainbox-admin users/tokens` (python -m core.admin): users, limits and tokens on the database."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from core.admin import app

runner = CliRunner()


def tb(*args: str, ok: bool = True):
    result = runner.invoke(app, list(args))
    if ok:
        assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result


def test_users_and_tokens_on_the_database(data_dir):
    assert "added user ann" in tb("users", "add", "ann").stdout
    tb("users", "add", "root", "--admin")
    dup = tb("users", "add", "ann", ok=False)
    assert dup.exit_code == 1 and "already exists" in dup.stderr
    created = tb("tokens", "create", "ann", "--name", "laptop", "--expires-days", "1")
    token = created.stdout.strip()
    assert token.startswith("tbx_") and len(token.splitlines()) == 1 and "shown once" in created.stderr
    token_id, secret = token.split("_")[1], token.split("_", 2)[2]
    listed = tb("tokens", "list").stdout
    assert token_id in listed and "laptop" in listed and "active" in listed and secret not in listed
    assert "max_gpus=2" in tb("users", "set", "ann", "--max-gpus", "2", "--max-priority", "3").stdout
    assert "max_gpus=-" in tb("users", "set", "ann", "--reset", "max-gpus").stdout
    quota = tb("users", "set", "ann", "--max-datasets", "3", "--max-dataset-bytes", "1000000", "--max-tokens", "4")
    assert "max_datasets=3" in quota.stdout and "max_dataset_bytes=1000000" in quota.stdout
    assert "max_tokens=4" in quota.stdout
    unknown = tb("users", "set", "[/]x", "--max-gpus", "1", ok=False)  # printed as is, not read as markup
    assert unknown.exit_code == 1 and "no user named '[/]x'" in unknown.stderr
    assert tb("users", "set", "ann", "--reset", "nonsense", ok=False).exit_code == 2
    table = tb("users", "list").stdout
    assert "ann" in table and "root" in table and "yes" in table
    assert "revoked" in tb("tokens", "revoke", token_id).stdout
    assert "revoked" in tb("tokens", "list", "--user", "ann").stdout
    assert tb("tokens", "revoke", "nope", ok=False).exit_code == 1
    assert tb("tokens", "create", "nobody", ok=False).exit_code == 1


def test_python_m_core_admin_runs_the_same_commands(data_dir):
    done = subprocess.run(
        [sys.executable, "-m", "core.admin", "users", "add", "bea"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "added user bea" in done.stdout, done.stderr
