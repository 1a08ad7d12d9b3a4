"""What the API imports stays light, and hub ids load from the local cache with no network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.trainer.conftest import REPO


def test_spec_paths_and_config_modules_do_not_import_torch() -> None:
    code = (
        "import sys; import trainer.spec, trainer.paths, trainer.dsconfig, trainer.presets, trainer.batch; "
        "print(json.dumps(sorted(m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", "import json; " + code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) == []


def test_hub_id_loads_from_the_local_cache_offline(tmp_path: Path) -> None:
    """A model in the Hugging Face cache layout (as `hf download` leaves it) trains by its hub id."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny-llama" / "snapshots" / ("0" * 40)
    (cache / "models--acme--tiny-llama" / "refs").mkdir(parents=True)
    (cache / "models--acme--tiny-llama" / "refs" / "main").write_text("0" * 40)
    code = f"""
import sys
from pathlib import Path
from trainer.model import build_model, load_tokenizer
from trainer.paths import ModelSource, resolve_model
src = ModelSource("preset", "tiny")
model = build_model(src, ds_config={{"zero_optimization": {{"stage": 0}}}}, gradient_checkpointing=False)
model.save_pretrained({str(snapshot)!r}); load_tokenizer(src).save_pretrained({str(snapshot)!r})
found = resolve_model("acme/tiny-llama", Path({str(tmp_path)!r}))
assert found.kind == "hub", found
loaded = build_model(found, ds_config={{"zero_optimization": {{"stage": 0}}}}, gradient_checkpointing=False)
tok = load_tokenizer(found)
print(found.kind, loaded.config.hidden_size, len(tok))
"""
    env = os.environ | {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines()[-1].split() == ["hub", "64", "4096"]
