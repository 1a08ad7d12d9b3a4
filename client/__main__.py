"""`python -m client` is the `trainbox` command (for checkouts without the console script)."""

from client.cli import app

app(prog_name="trainbox")
