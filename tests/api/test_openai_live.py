"""The official `openai` client against a live stack: uvicorn on a port, a real Celery worker and
2-rank CPU DeepSpeed (tests/worker/conftest.py's start_stack, on Redis db 7), preset:tiny for a few steps."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from redis import Redis

from tests.helpers import wait_for
from tests.worker.conftest import start_stack

openai = pytest.importorskip("openai")

REDIS_URL = "redis://127.0.0.1:6379/7"
STEPS = 6
TERMINAL = ("succeeded", "failed", "cancelled")


def chat(n: int, offset: int = 0) -> bytes:
    rows = []
    for i in range(offset, offset + n):
        messages = [
            {"role": "system", "content": "You add numbers."},
            {"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
        ]
        rows.append(json.dumps({"messages": messages}))
    return ("\n".join(rows) + "\n").encode()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    s = start_stack(tmp_path_factory.mktemp("openai-live"), REDIS_URL)
    yield s
    s.stop()
    Redis.from_url(REDIS_URL).flushdb()


def other_user_token(stack: Any) -> str:
    """A second user of the same server (made in its database, as `trainbox-admin users create` does)."""
    from core.db import make_engine, make_sessionmaker
    from core.users import create_token, create_user

    engine = make_engine(stack.env()["TRAINBOX_DATABASE_URL"])
    try:
        with make_sessionmaker(engine)() as s:
            create_user(s, name="bob")
            _, token = create_token(s, user_name="bob")
    finally:
        engine.dispose()
    return token


def test_the_openai_client_fine_tunes_on_the_box(stack: Any) -> None:
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=stack.token(), max_retries=0, timeout=60)

    train = client.files.create(file=("train.jsonl", chat(80)), purpose="fine-tune")
    val = client.files.create(file=("val.jsonl", chat(16, offset=500)), purpose="fine-tune")
    assert train.id.startswith("file-") and train.purpose == "fine-tune" and train.bytes == len(chat(80))

    job = client.fine_tuning.jobs.create(
        model="preset:tiny",
        training_file=train.id,
        validation_file=val.id,
        suffix="adder",
        seed=3,
        metadata={"suite": "live", "kind": "main"},
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}}},
        extra_body={"trainbox": {"gpus": 2, "seq_len": 64, "max_steps": STEPS, "checkpoint_every": 3, "eval_every": 3}},
    )
    assert job.status in ("queued", "validating_files", "running") and job.metadata == {"suite": "live", "kind": "main"}
    assert job.hyperparameters.batch_size == 4 and job.hyperparameters.n_epochs == 1 and job.seed == 3
    with pytest.raises(openai.ConflictError) as in_use:  # the job trains on it
        client.files.delete(train.id)
    assert in_use.value.code == "file_in_use"

    # A second job waits behind the first (both CPU slots are taken), paused.
    other = client.fine_tuning.jobs.create(
        model="preset:tiny",
        training_file=train.id,
        metadata={"suite": "live", "kind": "cancelled"},
        extra_body={"trainbox": {"gpus": 2, "seq_len": 64, "max_steps": 1000}},
    )
    assert client.fine_tuning.jobs.pause(other.id).status == "paused"

    # Page through the events (newest first, two at a time) until the job has ended.
    def ended() -> Any:
        current = client.fine_tuning.jobs.retrieve(job.id)
        if current.status not in TERMINAL:
            return None
        # Read after the job ended (read before, its last events may not be there yet).
        return current, list(client.fine_tuning.jobs.list_events(job.id, limit=2))  # the client follows `after`

    done, events = wait_for(ended, timeout=240, interval=1.0, what="the fine-tuning job to end")
    # The paused job was passed over when the slots came free; resumed, it is placed; then cancelled.
    assert client.fine_tuning.jobs.retrieve(other.id).status == "paused"
    assert client.fine_tuning.jobs.resume(other.id).status in ("queued", "validating_files")
    assert client.fine_tuning.jobs.cancel(other.id).id == other.id
    wait_for(lambda: client.fine_tuning.jobs.retrieve(other.id).status == "cancelled", timeout=60, what="cancel")
    assert done.status == "succeeded", (done.error, [e.message for e in events])
    messages = [e.message for e in events]
    assert messages[0] == "The job has successfully completed" and messages[-1] == f"Created fine-tuning job: {job.id}"
    metrics = [e for e in events if e.type == "metrics"]
    assert [e.data["step"] for e in metrics] == list(range(STEPS, 0, -1)), "each step once"
    assert all(e.data["train_loss"] is not None for e in metrics)
    assert any(e.data["valid_loss"] is not None for e in metrics), "eval events are stored with their steps"
    assert f"Step {STEPS}/{STEPS}: training loss=" in messages[1]
    assert done.fine_tuned_model == f"ft:preset:tiny:{done.organization_id}:adder:{job.id}" and done.trained_tokens
    assert done.finished_at is not None and done.training_file == train.id and done.validation_file == val.id

    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id))
    assert checkpoints and checkpoints[0].step_number == STEPS
    assert checkpoints[0].metrics.train_loss is not None
    assert checkpoints[0].fine_tuned_model_checkpoint.endswith(f":ckpt-step-{STEPS}")

    [result] = done.result_files
    csv = client.files.content(result).text.splitlines()
    assert csv[0] == "step,train_loss,valid_loss,epoch,lr,tokens_per_s" and len(csv) == STEPS + 1
    assert client.files.retrieve(result).purpose == "fine-tune-results"

    # Lists: newest first, `after` pages, the metadata filter.
    first = client.fine_tuning.jobs.list(limit=1)
    assert [j.id for j in first.data] == [other.id] and first.has_more
    assert [j.id for j in client.fine_tuning.jobs.list(after=other.id, limit=5).data] == [job.id]
    kept = client.fine_tuning.jobs.list(metadata={"kind": "main"})
    assert [j.id for j in kept.data] == [job.id]
    assert {f.id for f in client.files.list()} == {train.id, val.id}

    # Errors, in OpenAI's envelope, as the client raises them.
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve("file-dnosuchfile")
    with pytest.raises(openai.BadRequestError) as bad:
        client.fine_tuning.jobs.create(model="preset:tiny", training_file="file-dnosuchfile")
    assert bad.value.param == "training_file" and bad.value.code == "file_not_found"
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("x.jsonl", chat(2)), purpose="assistants")
    with pytest.raises(openai.BadRequestError) as dpo:
        client.fine_tuning.jobs.create(
            model="preset:tiny", training_file=train.id, method={"type": "dpo", "dpo": {"hyperparameters": {}}}
        )
    assert "not supported" in str(dpo.value)
    bob = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=other_user_token(stack), max_retries=0)
    with pytest.raises(openai.NotFoundError):
        bob.fine_tuning.jobs.retrieve(job.id)
    with pytest.raises(openai.NotFoundError):
        bob.files.content(result)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{stack.url}/v1", api_key="not-a-token", max_retries=0).files.list()

    # Deleting an upload no unfinished job uses.
    deleted = client.files.delete(val.id)
    assert deleted.deleted and deleted.id == val.id
