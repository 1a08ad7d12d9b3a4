"""Property-based checks of the whole API against its own OpenAPI document (schemathesis), as an
authenticated admin: every phase (examples, coverage, fuzzing, and stateful sequences that follow the
OpenAPI links from POST /jobs to the job's routes) with every check, 60 examples per operation.

Two checks are narrowed, not dropped: a schema-valid body may still be refused by a rule no JSON
schema can state (the files a spec names must exist, the batch arithmetic, what the boxes can hold, a
dataset's lines). Those 422s carry their rule as the error `type` and the operation descriptions list
them; a 422 of any other kind for schema-valid data is a failure. And a multipart file part has no JSON
type on the wire, so a "boolean" file is not schema-violating data. Everything else every check finds
is a failure.
"""

from __future__ import annotations

import os
import random
from collections import defaultdict

import pytest
import schemathesis
from schemathesis.checks import negative_data_rejection, positive_data_acceptance
from schemathesis.core.failures import Failure
from schemathesis.engine import events, from_schema

from api.app import create_app
from api.routers.jobs import SPEC_RULES as DOCUMENTED_RULES

# The live stream only ends with its job; it has its own tests (test_events.py).
SKIP = "/jobs/{job_id}/events"
EXAMPLES = 60
# Rules the spec's JSON schema cannot state; POST /jobs and /jobs/validate document them.
SPEC_RULES = set(DOCUMENTED_RULES)
RULED = {"POST /jobs", "POST /jobs/validate"}
# Other operations' documented rules: prune needs an age when the server sets no retention.
OTHER_RULES = {"POST /admin/prune": {"retention_not_set"}}


@schemathesis.check
def positive_data_acceptance_beyond_stated_rules(ctx, response, case):
    """positive_data_acceptance, except a 422 naming only rules the operation documents as unstatable."""
    if response.status_code == 422 and _refused_by_stated_rule(case, response):
        return None
    return positive_data_acceptance(ctx, response, case)


@schemathesis.check
def negative_data_rejection_on_the_wire(ctx, response, case):
    """negative_data_rejection, except an upload's file part "of another type": a multipart part is
    bytes on the wire, so a `true` generated as the file is a file holding the line "true"."""
    try:
        return negative_data_rejection(ctx, response, case)
    except Failure as failure:
        if case.operation.label == "POST /datasets" and "at /properties/file (was string" in str(failure):
            return None
        raise


def _refused_by_stated_rule(case, response) -> bool:
    try:
        types = {e["type"] for e in response.json()["detail"]}
    except (ValueError, KeyError, TypeError):
        return False
    if case.operation.label in RULED:
        return bool(types) and types <= SPEC_RULES
    if case.operation.label in OTHER_RULES:
        return bool(types) and types <= OTHER_RULES[case.operation.label]
    if case.operation.label == "POST /datasets":
        # Every line of an upload is checked (JSONL with the text field, or UTF-8 text): content rules.
        return all(e["msg"].startswith("upload refused:") for e in response.json()["detail"])
    return False


# The schema is the same on either database; the run that finds database-specific 500s is Postgres's.
@pytest.mark.parametrize("api_env", ["postgres"], indirect=True)
def test_api_conforms_to_its_schema(client, settings):
    seed = int(os.environ.get("TRAINBOX_SCHEMATHESIS_SEED") or random.randrange(2**32))
    token = client.headers["Authorization"]
    # An app of its own: schemathesis runs the app's lifespan, which must not close the shared app's Redis.
    app = create_app(settings, dispatch=lambda *_: None)
    try:
        failures, phases = _run(app, token, seed)
    finally:
        app.state.engine.dispose()
    assert phases["stateful"] == "ran", phases
    assert not failures, f"seed {seed} (TRAINBOX_SCHEMATHESIS_SEED to replay):\n" + "\n".join(failures)


def _run(app, token: str, seed: int) -> tuple[list[str], dict[str, str]]:
    config = schemathesis.Config.from_dict(
        {
            "seed": seed,
            "headers": {"Authorization": token},
            "generation": {"max-examples": EXAMPLES},
            # Both replaced by the narrowed checks above (every other check runs as it is).
            "checks": {
                "enabled": True,
                "positive_data_acceptance": {"enabled": False},
                "negative_data_rejection": {"enabled": False},
            },
            "phases": {"stateful": {"max-steps": 12}},
        }
    )
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config).exclude(path=SKIP)
    links = schema.raw_schema["paths"]["/jobs"]["post"]["responses"]["201"]["links"]
    assert {"GetJob", "CancelJob", "JobMetrics", "JobLogs", "JobArtifacts"} <= set(links)
    found: dict[tuple[str, str | None, str], list[str]] = defaultdict(list)
    phases: dict[str, str] = {}
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            for checks in event.recorder.checks.values():
                for check in checks:
                    if check.failure_info is not None:
                        failure = check.failure_info.failure
                        key = (event.phase.value, event.label, f"{check.name}: {failure.title}")
                        found[key].append(f"{failure.message}\n{check.failure_info.code_sample[:600]}")
        elif isinstance(event, events.PhaseFinished):
            phases[event.phase.name.value] = "skipped" if event.status.name == "SKIP" else "ran"
        elif isinstance(event, (events.NonFatalError, events.FatalError)):
            found[("error", None, type(event).__name__)].append(str(getattr(event, "info", event)))
    failures = [f"{phase} {label}: {what} ({len(v)}x)\n{v[0]}" for (phase, label, what), v in found.items()]
    return failures, phases


def test_found_by_it_auto_warmup_min_lr_is_valid_not_a_500(client):
    """The bound of warmup_min_lr was applied to "auto" too: a TypeError, answered 500."""
    from tests.api.conftest import spec

    scheduler = {"type": "WarmupLR", "params": {"warmup_min_lr": "auto"}}
    r = client.post("/jobs/validate", json=spec(deepspeed={"train_batch_size": 8, "scheduler": scheduler}))
    assert r.status_code == 200, r.text
    negative = {**scheduler, "params": {"warmup_min_lr": -1}}
    r = client.post("/jobs/validate", json=spec(deepspeed={"train_batch_size": 8, "scheduler": negative}))
    assert r.status_code == 422


def test_found_by_it_false_is_not_a_limit(client):
    """`max_priority: false` was taken as a limit of 0 where the schema says integer."""
    from tests.api.conftest import make_user
    from tests.api.test_jobs import only_error

    make_user(client, "ann")
    for value in (False, "5", 2.5):
        [err] = only_error(client.patch("/users/ann", json={"max_priority": value}), 422)
        assert err["loc"] == ["body", "max_priority"]
    assert client.patch("/users/ann", json={"max_priority": 3.0}).json()["limits"]["max_priority"] == 3
