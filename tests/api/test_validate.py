"""POST /jobs/validate: the dry run reports config, sizes, memory and queue position, stores nothing."""

from __future__ import annotations

from tests.api.conftest import spec
from tests.api.test_jobs import add_box, only_error

DEEPSEEK = spec(
    name="deepseek-1.3b-sft",
    model="preset:deepseek-1.3b",
    gpus=2,
    seq_len=512,
    deepspeed={
        "train_batch_size": 32,
        "gradient_accumulation_steps": 4,
        "fp16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 5e-5, "weight_decay": 0.01}},
        "zero_optimization": {"stage": 2},
    },
)


def test_validate_reports_resolved_config_and_memory(client, sessions):
    add_box(sessions, n=3, memory_mb=24564)
    client.post("/jobs", json=spec(gpus=3, deepspeed={"train_batch_size": 6}))  # takes every GPU
    client.post("/jobs", json=spec())  # waits
    r = client.post("/jobs/validate", json=DEEPSEEK)
    assert r.status_code == 200, r.text
    v = r.json()
    assert (v["world_size"], v["micro_batch"], v["grad_accum"], v["train_batch_size"]) == (2, 4, 4, 32)
    ds = v["deepspeed_config"]
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["zero_optimization"]["stage"] == 2
    assert ds["fp16"]["enabled"] is True and v["precision"] == "fp16"
    assert 1.3e9 < v["n_params"] < 1.4e9
    mem = v["memory"]
    assert 10 < mem["per_gpu_gb"] < 24 and mem["gpu_memory_gb"] == 23.99 and mem["fits"] is True
    assert set(mem["breakdown_gb"]) >= {"weights", "gradients", "optimizer", "activations"}
    assert v["queue_position"] == 2
    assert v["model"] == {"kind": "preset", "name": "deepseek-1.3b"}
    assert len(client.get("/jobs").json()["data"]) == 2  # nothing stored


def test_validate_says_when_it_does_not_fit(client, sessions):
    add_box(sessions, n=3, memory_mb=24564)
    body = {**DEEPSEEK, "gpus": 1, "deepspeed": {**DEEPSEEK["deepspeed"], "zero_optimization": {"stage": 0}}}
    body["deepspeed"]["train_batch_size"] = 16
    v = client.post("/jobs/validate", json=body).json()
    assert v["memory"]["fits"] is False and v["memory"]["per_gpu_gb"] > 24


def test_validate_without_gpus_cannot_judge_fit(client, sessions):
    v = client.post("/jobs/validate", json=spec(model="my-llama")).json()
    assert v["memory"]["fits"] is None and v["memory"]["per_gpu_gb"] > 0
    assert v["model"] == {"kind": "local", "name": "my-llama"} and v["queue_position"] == 1
    assert any("total steps" in n for n in client.post("/jobs/validate", json=spec(max_steps=None)).json()["notes"])


def test_validate_errors_match_submit(client):
    [err] = only_error(client.post("/jobs/validate", json={**DEEPSEEK, "gpus": 3}), 422)
    assert "impossible batch" in err["msg"]
    [err] = only_error(client.post("/jobs/validate", json=spec(dataset={"path": "corpus/missing.jsonl"})), 422)
    assert err["loc"] == ["body", "dataset", "path"]
