"""Spec files: YAML numbers are numbers, as the server (JSON Schema numbers only) expects them."""

from __future__ import annotations

from pathlib import Path

from client.cli_common import load_spec
from trainer.spec import JobSpec


def test_yaml_exponents_without_a_dot_are_numbers(tmp_path: Path) -> None:
    """PyYAML reads `1e-4` as a string; the spec refuses strings where numbers go (no lax coercion)."""
    path = tmp_path / "job.yaml"
    path.write_text(
        "name: j\nmodel: preset:tiny\ndataset: {path: d.jsonl}\n"
        "deepspeed:\n  train_batch_size: 1e1\n  optimizer: {params: {lr: 1e-4, eps: 1E-8}}\n"
        "  gradient_clipping: +1.5e0\n"
    )
    spec = load_spec(path)
    assert spec["deepspeed"]["optimizer"]["params"] == {"lr": 1e-4, "eps": 1e-8}
    parsed = JobSpec.model_validate(spec)
    assert parsed.deepspeed.train_batch_size == 10 and parsed.deepspeed.gradient_clipping == 1.5
    path.write_text("name: '1e5'\nversion: 1.0\ncount: 12\n")
    assert load_spec(path) == {"name": "1e5", "version": 1.0, "count": 12}
