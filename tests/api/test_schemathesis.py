"""Property-based checks of the whole API against its own OpenAPI document (schemathesis), as an
authenticated user: no 5xx, and every response matches the documented status codes and schemas."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import positive_data_acceptance

from api.app import create_app

# The live stream only ends with its job; it has its own tests (test_events.py).
SKIP = {"/jobs/{job_id}/events"}
EXAMPLES = 25
# A schema-valid spec may still be refused with 422: its files must exist under the roots and its
# batch sizes must divide (rules no JSON schema can state). Every other check runs.
EXCLUDED = [positive_data_acceptance]


def test_api_conforms_to_its_schema(client, settings):
    auth = {"Authorization": client.headers["Authorization"]}
    # An app of its own: schemathesis runs the app's lifespan, which must not close the shared app's Redis.
    app = create_app(settings, dispatch=lambda *_: None)
    try:
        _run_schemathesis(app, auth)
    finally:
        app.state.engine.dispose()


def _run_schemathesis(app, auth):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    checked = []
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path in SKIP:
            continue

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def conforms(case):
            case.call_and_validate(headers=auth, excluded_checks=EXCLUDED)

        conforms()
        checked.append(f"{operation.method.upper()} {operation.path}")
    assert len(checked) >= 14, checked


def test_found_by_it_auto_warmup_min_lr_is_valid_not_a_500(client):
    """The bound of warmup_min_lr was applied to "auto" too: a TypeError, answered 500."""
    from tests.api.conftest import spec

    scheduler = {"type": "WarmupLR", "params": {"warmup_min_lr": "auto"}}
    r = client.post("/jobs/validate", json=spec(deepspeed={"train_batch_size": 8, "scheduler": scheduler}))
    assert r.status_code == 200, r.text
    negative = {**scheduler, "params": {"warmup_min_lr": -1}}
    r = client.post("/jobs/validate", json=spec(deepspeed={"train_batch_size": 8, "scheduler": negative}))
    assert r.status_code == 422
