"""POST /jobs/validate: the dry run reports config, sizes, memory and queue position, stores nothing."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select

from core.models import Job
from tests.api.conftest import make_user, spec
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


def test_validate_says_when_it_is_tight(client, sessions):
    """Within the box but above 95% of it: accepted, with `fits` false as a warning."""
    add_box(sessions, n=3, memory_mb=24564)
    ds = {
        **DEEPSEEK["deepspeed"],
        "zero_optimization": {"stage": 1},
        "train_batch_size": 16,
        "gradient_accumulation_steps": 1,
    }
    v = client.post("/jobs/validate", json={**DEEPSEEK, "deepspeed": ds}).json()
    assert v["memory"]["fits"] is False and 23.99 * 0.95 < v["memory"]["per_gpu_gb"] < 23.99


def test_validate_without_gpus_cannot_judge_fit(client, sessions):
    v = client.post("/jobs/validate", json=spec(model="my-llama")).json()
    assert v["memory"]["fits"] is None and v["memory"]["per_gpu_gb"] > 0
    assert any("no box registered yet: checked against 24 GB" in n for n in v["notes"])
    assert v["model"] == {"kind": "local", "name": "my-llama"} and v["queue_position"] == 1
    assert any("total steps" in n for n in client.post("/jobs/validate", json=spec(max_steps=None)).json()["notes"])


def test_validate_errors_match_submit(client):
    [err] = only_error(client.post("/jobs/validate", json={**DEEPSEEK, "gpus": 3}), 422)
    assert "impossible batch" in err["msg"]
    [err] = only_error(client.post("/jobs/validate", json=spec(dataset={"path": "corpus/missing.jsonl"})), 422)
    assert err["loc"] == ["body", "dataset", "path"]


# --- admission by memory (the estimate the dry run shows decides) ---------------------------------

TOO_BIG = {
    **DEEPSEEK,
    "deepspeed": {
        **DEEPSEEK["deepspeed"],
        "zero_optimization": {"stage": 1},
        "train_batch_size": 32,
        "gradient_accumulation_steps": 1,
    },
}


def test_spec_no_box_can_hold_is_refused_with_the_estimate_and_settings_that_fit(client, sessions):
    """A spec estimated over every box's memory was accepted (`fits: false`) and would OOM after the queue."""
    add_box(sessions, n=3, memory_mb=24564)
    for route in ("/jobs/validate", "/jobs"):
        [err] = only_error(client.post(route, json=TOO_BIG), 422)
        assert err["type"] == "does_not_fit" and err["loc"] == ["body"]
        assert "estimated memory ~33.3 GB per GPU is more than 23.99 GB per GPU" in err["msg"]
        assert "train_micro_batch_size_per_gpu 8 with gradient_accumulation_steps 2" in err["msg"]
        assert "gradient_checkpointing true" in err["msg"]
    assert client.get("/jobs").json()["data"] == []
    # The first suggestion is accepted as suggested.
    ds = {**TOO_BIG["deepspeed"], "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2}
    assert client.post("/jobs", json={**TOO_BIG, "deepspeed": ds}).status_code == 201


def test_micro_batch_of_100000_at_2048_tokens_is_refused(client, sessions):
    """It was accepted with an estimate of 9,473 GB per GPU and `fits: null`."""
    body = spec(seq_len=2048, deepspeed={"train_micro_batch_size_per_gpu": 100000})
    err = only_error(client.post("/jobs/validate", json=body), 422)[0]  # then: nor is it "auto"
    assert err["loc"] == ["body", "deepspeed", "train_micro_batch_size_per_gpu"] and "4096" in err["msg"]
    body = spec(seq_len=2048, deepspeed={"train_micro_batch_size_per_gpu": 4096})
    [err] = only_error(client.post("/jobs/validate", json=body), 422)
    assert "no box registered yet" in err["msg"] and "settings that fit" in err["msg"]
    err = only_error(client.post("/jobs", json=spec(deepspeed={"gradient_accumulation_steps": 10**12})), 422)[0]
    assert err["loc"] == ["body", "deepspeed", "gradient_accumulation_steps"]


def test_no_box_registered_assumes_the_reference_gpu_or_skips_when_told(client, settings, monkeypatch):
    [err] = only_error(client.post("/jobs/validate", json=TOO_BIG), 422)
    assert "more than 24 GB per GPU (no box registered yet)" in err["msg"]
    monkeypatch.setattr(settings, "assumed_gpu_memory_gb", 0.0)
    v = client.post("/jobs/validate", json=TOO_BIG)
    assert v.status_code == 200 and "no box registered yet: memory not checked" in v.json()["notes"]


def test_cpu_box_is_capped_by_host_memory(client, sessions, settings, monkeypatch):
    """CPU slots have no GPU memory: all ranks share the host's, which bounds the whole job."""
    from core.scheduler import GpuInfo, register_box

    with sessions() as s:
        register_box(s, "cpubox", [GpuInfo(i, "cpu-slot", None) for i in range(2)])
        s.commit()
    monkeypatch.setattr(settings, "cpu_box_memory_gb", 16.0)
    body = spec(gpus=2, seq_len=2048, deepspeed={"train_micro_batch_size_per_gpu": 4096})
    [err] = only_error(client.post("/jobs", json=body), 422)
    assert "per rank is more than 16.0 GB of host memory shared by 2 CPU ranks" in err["msg"], err
    v = client.post("/jobs/validate", json=spec(gpus=2, deepspeed={"train_batch_size": 8})).json()
    assert "CPU box: 2 ranks share 16.0 GB of host memory" in v["notes"] and v["memory"]["fits"] is None


@pytest.mark.parametrize(
    "ds",
    [
        {"zero_optimization": {"stage": 2, "reduce_bucket_size": 0}},
        {"zero_optimization": {"stage": 2, "reduce_bucket_size": -1}},
        {"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": -5}}},
        {"scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": -1e-4}}},
        {"gradient_clipping": -1},
    ],
)
def test_values_deepspeed_refuses_are_422_at_submission(client, ds):
    """They passed validation and failed (or silently ran unclipped) inside DeepSpeed after the queue."""
    errors = only_error(client.post("/jobs/validate", json=spec(deepspeed={"train_batch_size": 8, **ds})), 422)
    assert errors[0]["loc"][:2] == ["body", "deepspeed"]


def test_left_out_max_runtime_s_gets_the_default_and_shows_it(client):
    """README said a spec without max_runtime_s is refused; it was accepted. It is, and says with what."""
    body = spec()
    body.pop("max_runtime_s", None)
    v = client.post("/jobs/validate", json=body).json()
    assert v["max_runtime_s"] == 86400 and "max_runtime_s not given: 86400 s" in v["notes"]
    assert client.post("/jobs", json=body).json()["spec"]["max_runtime_s"] == 86400
    assert client.post("/jobs/validate", json=spec(max_runtime_s=600)).json()["max_runtime_s"] == 600
    [err] = only_error(client.post("/jobs", json=spec(max_runtime_s=None)), 422)
    assert err["loc"] == ["body", "max_runtime_s"]


def test_left_out_max_runtime_s_respects_a_lower_cap(client, sessions):
    """With a cap below the default, leaving the field out must not be refused as over the cap."""
    from core.users import set_limits

    bob = make_user(client, "bob")
    with sessions() as s:
        set_limits(s, name="bob", max_runtime_s=3600)
    job = client.post("/jobs", json=spec(), headers=bob)
    assert job.status_code == 201 and job.json()["spec"]["max_runtime_s"] == 3600, job.text
    v = client.post("/jobs/validate", json=spec(), headers=bob).json()
    assert v["max_runtime_s"] == 3600 and "max_runtime_s not given: 3600 s (your cap)" in v["notes"]
    only_error(client.post("/jobs", json=spec(max_runtime_s=7200), headers=bob), 403)


def _write(settings, name: str, records: list) -> str:
    path = settings.data_root / "finetune" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return f"finetune/{name}"


def _chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def test_validate_reports_the_data_its_masking_overlong_examples_and_split(client, settings):
    # 90 short conversations whose answers are a small part of the text, and 10 far over seq_len.
    records = [_chat("why is the sky blue? " * 8, "scattering.") for _ in range(90)]
    records += [_chat("tell me everything. " * 200, "no.") for _ in range(10)]
    path = _write(settings, "chat.jsonl", records)
    body = spec(dataset={"path": path}, seq_len=128, validation_split=0.2)
    v = client.post("/jobs/validate", json=body)
    assert v.status_code == 200, v.text
    data = v.json()["data"]
    train = data["train"]
    assert (train["data_format"], train["file_format"], train["records"], train["records_counted"]) == (
        "chat",
        "jsonl",
        100,
        True,
    )
    # Only the answers (and each turn's end) are trained on by default: a small share.
    assert 0 < train["trained_share"] < 0.2
    assert train["overlong"] == 10 and train["overlong_policy"] == "dropped"
    assert 100 * 40 < train["estimated_tokens"] < 100 * 40 + 10 * 1200
    assert data["split"] == {"fraction": 0.2, "train_records": 80, "validation_records": 20}
    assert data["validation"] is None

    every = client.post(
        "/jobs/validate",
        json=spec(dataset={"path": path, "train_on": "all", "overlong": "truncate"}, seq_len=128),
    ).json()["data"]["train"]
    assert every["trained_share"] == 1.0 and every["overlong_policy"] == "truncated"
    assert every["estimated_tokens"] == train["estimated_tokens"] and every["overlong"] == 10

    text = client.post("/jobs/validate", json=spec()).json()["data"]["train"]
    assert (text["data_format"], text["trained_share"], text["overlong_policy"]) == ("text", 1.0, "packed")


def test_a_validation_file_is_checked_at_submission_and_reported(client, settings, sessions):
    train = _write(settings, "pc-train.jsonl", [{"prompt": f"{i} + 1 =", "completion": f" {i + 1}"} for i in range(40)])
    val = _write(settings, "pc-val.jsonl", [{"prompt": f"{i} + 2 =", "completion": f" {i + 2}"} for i in range(8)])
    ok = client.post("/jobs/validate", json=spec(dataset={"path": train}, validation={"path": val}))
    assert ok.status_code == 200, ok.text
    report = ok.json()["data"]
    assert report["validation"]["data_format"] == "prompt_completion" and report["validation"]["records"] == 8

    chat = _write(settings, "chat-val.jsonl", [_chat("hi", "hello")] * 4)
    bad = _write(settings, "bad-val.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "no completion"}])
    cases = [
        ({"path": chat}, ["body", "validation"], "validation data is chat but the training data is prompt_completion"),
        ({"path": bad}, ["body", "validation"], "line 2 has no 'completion' field"),
        ({"path": "finetune/missing.jsonl"}, ["body", "validation", "path"], "not found"),
    ]
    for ref, loc, fragment in cases:
        for route in ("/jobs", "/jobs/validate"):
            [err] = only_error(client.post(route, json=spec(dataset={"path": train}, validation=ref)), 422)
            assert err["loc"] == loc and fragment in err["msg"] and err["type"] == "file_not_usable", err
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 0, "nothing was queued"


def test_another_users_upload_is_no_validation_file(client, sessions):
    ann, bob = make_user(client, "ann-val"), make_user(client, "bob-val")
    content = "".join(json.dumps({"text": f"line {i} " * 10}) + "\n" for i in range(20)).encode()
    ds = client.post("/datasets", files={"file": ("v.jsonl", content)}, headers=ann).json()
    mine = client.post("/jobs/validate", json=spec(validation={"id": ds["id"]}), headers=ann)
    assert mine.status_code == 200, mine.text
    assert mine.json()["data"]["validation"]["records"] == 20
    [err] = only_error(client.post("/jobs", json=spec(validation={"id": ds["id"]}), headers=bob), 422)
    assert err["loc"] == ["body", "validation", "id"] and ds["id"] in err["msg"]
