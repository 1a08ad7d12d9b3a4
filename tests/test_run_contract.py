"""The run contract (trainer/events.py) is the one place for the run's facts: the step and eval events
the loop writes carry exactly its field lists, job_metrics keeps exactly its stored step fields, and no
server package spells a run-dir file name itself."""

from __future__ import annotations

import ast
from pathlib import Path

from core.models import JobMetric
from trainer import events

ROOT = Path(__file__).resolve().parents[1]


def _emitted(event_type: str) -> list[set[str]]:
    """The keyword fields of each emit(`event_type`, ...) in trainer/loop.py."""
    tree = ast.parse((ROOT / "trainer" / "loop.py").read_text())
    return [
        {k.arg for k in node.keywords if k.arg}
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and getattr(node.func, "attr", None) == "emit"
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and node.args[0].value == event_type
    ]


def test_step_and_eval_events_carry_only_contract_fields_and_every_stored_one():
    [step] = _emitted("step")
    assert step | {"time"} == set(events.STEP_FIELDS), "the loop's step event and the contract's list differ"
    evals = _emitted("eval")
    assert evals, "the loop writes eval events"
    for fields in evals:
        assert fields | {"time"} == set(events.EVAL_FIELDS), "an eval event and the contract's list differ"
    assert set(events.TRAINER_ERROR_TYPES) | {events.ErrorType.LOST, events.ErrorType.TIMEOUT} == set(events.ErrorType)


def test_job_metrics_columns_are_the_stored_step_and_eval_fields():
    assert set(events.STEP_METRIC_FIELDS) <= set(events.STEP_FIELDS)
    assert set(events.EVAL_METRIC_FIELDS) <= set(events.EVAL_FIELDS)
    columns = set(JobMetric.__table__.columns.keys()) - {"id", "job_id", "attempt"}
    assert columns == set(events.STEP_METRIC_FIELDS) | set(events.EVAL_METRIC_FIELDS)


def test_the_api_shows_every_stored_metric_and_latest_field():
    from api.schemas import Latest, Metric
    from core.progress import LATEST_FIELDS

    assert set(Metric.model_fields) == set(JobMetric.__table__.columns.keys()) - {"id", "job_id"}
    assert set(Latest.model_fields) == {*LATEST_FIELDS, "time"}


def test_no_server_package_spells_a_run_dir_file_name():
    names = {events.EVENTS_FILE, events.LOG_FILE, events.LAUNCHER_LOG, events.SPEC_FILE}
    found = []
    for package in ("api", "core", "worker"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and node.value in names:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert found == [], "import the names from trainer.events"
