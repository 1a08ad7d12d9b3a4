"""The hot paths cost the same however long the queue: GET /jobs/{id}, GET /jobs and POST /jobs issue as
many SQL statements with 200 jobs queued as with 5; reading a job walks no directory; a submit does not
read an upload again; positions shown stay right through submits, cancels and scheduling passes."""

from __future__ import annotations

import os
from contextlib import contextmanager

from sqlalchemy import event, update

from core.models import Gpu, Job, new_job_id, utcnow
from core.scheduler import schedule
from tests.api.conftest import make_user, spec
from tests.api.test_datasets import JSONL, upload
from tests.api.test_jobs import add_box
from tests.core.factories import queue_positions
from trainer.paths import uploaded_dataset_path


@contextmanager
def statements(engine):
    """Records (statement, rows it returned or changed) for each SQL statement the engine executes inside
    the block. Rows are known on Postgres (psycopg's rowcount); SQLite's driver gives -1 for a SELECT."""
    seen: list[tuple[str, int]] = []

    def record(_conn, cursor, statement, *_args) -> None:
        seen.append((statement, max(cursor.rowcount, 0)))

    event.listen(engine, "after_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "after_cursor_execute", record)


def _fill_queue(sessions, n: int, owner: str) -> None:
    """n queued jobs in one insert, then the scheduling pass that stores their positions."""
    now = utcnow()
    with sessions() as s:
        s.execute(update(Job).where(Job.state == "queued").values(state="cancelled", queue_position=None))
        s.add_all(
            Job(
                id=new_job_id(),
                name=f"q{i}",
                owner=owner,
                state="queued",
                spec=spec(),
                gpus=1,
                priority=0,
                attempt=1,
                max_attempts=3,
                cancel_requested=False,
                created_at=now,
                updated_at=now,
            )
            for i in range(n)
        )
        s.commit()
        schedule(s, None)


def _full_box(client, sessions) -> None:
    """A box whose only GPU a running job holds: every submit runs a pass that places nothing."""
    add_box(sessions, n=1)
    r = client.post("/jobs", json=spec())
    assert r.status_code == 201, r.text
    with sessions() as s:
        s.execute(update(Job).where(Job.id == r.json()["id"]).values(state="running"))
        s.commit()


def test_reads_and_submits_issue_the_same_statements_at_5_and_at_200_queued(client, sessions):
    make_user(client, "filler")
    _full_box(client, sessions)
    engine = client.app.state.engine
    finished = client.post("/jobs", json=spec()).json()["id"]
    with sessions() as s:
        s.execute(update(Job).where(Job.id == finished).values(state="succeeded", queue_position=None))
        s.commit()
    now = utcnow()
    with sessions() as s:  # a history longer than a page
        s.add_all(
            Job(
                id=new_job_id(),
                name=f"f{i}",
                owner="filler",
                state="succeeded",
                spec=spec(),
                gpus=1,
                priority=0,
                attempt=1,
                max_attempts=3,
                cancel_requested=False,
                created_at=now,
                updated_at=now,
            )
            for i in range(60)
        )
        s.commit()
    counts: dict[int, dict[str, tuple[int, int]]] = {}
    for n in (5, 200):
        _fill_queue(sessions, n, owner="filler")  # another user's: the admin `local` reads them
        queued = max(queue_positions(sessions()).items(), key=lambda kv: kv[1])[0]  # the tail
        counts[n] = {}
        for name, call in {
            "GET queued": lambda q=queued: client.get(f"/jobs/{q}"),
            "GET finished": lambda: client.get(f"/jobs/{finished}"),
            "GET page": lambda: client.get("/jobs", params={"limit": 50}),
            "POST": lambda: client.post("/jobs", json=spec()),
        }.items():
            with statements(engine) as seen:
                r = call()
            assert r.status_code in (200, 201), r.text
            counts[n][name] = (len(seen), sum(rows for _, rows in seen))  # the whole queue once was 1 statement
        assert client.get(f"/jobs/{queued}").json()["queue_position"] == n
    assert counts[5] == counts[200], f"(SQL statements, rows) per request, 5 vs 200 queued: {counts}"


def test_reading_a_job_walks_no_directory(client, monkeypatch, settings):
    job = client.post("/jobs", json=spec()).json()
    (settings.run_dir(job["id"]) / "checkpoints" / "step-1").mkdir(parents=True)
    walked: list[str] = []
    real_walk, real_scandir = os.walk, os.scandir
    monkeypatch.setattr(os, "walk", lambda *a, **k: walked.append("walk") or real_walk(*a, **k))
    monkeypatch.setattr(os, "scandir", lambda *a, **k: walked.append("scandir") or real_scandir(*a, **k))
    got = client.get(f"/jobs/{job['id']}").json()
    assert walked == []
    assert got["artifacts"] == {"href": f"/jobs/{job['id']}/artifacts"}
    listing = client.get(got["artifacts"]["href"])
    assert listing.status_code == 200 and walked, "the listing itself does walk the run directory"


def test_a_submit_uses_the_stats_stored_at_upload(client, settings):
    ann = make_user(client, "ann")
    ds = upload(client, JSONL, ann).json()
    # The file changes behind the service's back: a submit that reads it as it was checked does not read it.
    assert settings.data_root is not None
    uploaded_dataset_path(settings.data_root.resolve(), ds["id"]).write_bytes(b"not json at all\n")
    r = client.post("/jobs", json=spec(dataset={"id": ds["id"]}), headers=ann)
    assert r.status_code == 201, r.text
    # Read differently (another text field) than it was checked at upload, it is read again.
    r = client.post("/jobs", json=spec(dataset={"id": ds["id"], "format": "jsonl", "text_field": "body"}), headers=ann)
    assert r.status_code == 422 and "not valid JSON" in r.text, r.text


def test_positions_shown_stay_right_through_submits_cancels_and_passes(client, sessions):
    add_box(sessions, n=1)
    ids = [client.post("/jobs", json=spec()).json()["id"] for _ in range(5)]  # the first takes the GPU
    assert [client.get(f"/jobs/{i}").json()["queue_position"] for i in ids] == [None, 1, 2, 3, 4]
    assert client.post(f"/jobs/{ids[2]}/cancel").status_code == 202
    assert [client.get(f"/jobs/{i}").json()["queue_position"] for i in ids[1:]] == [1, None, 2, 3]
    urgent = client.post("/jobs", json=spec(priority=3)).json()
    assert urgent["queue_position"] == 1
    page = {j["id"]: j["queue_position"] for j in client.get("/jobs").json()["data"]}
    assert page == {urgent["id"]: 1, ids[1]: 2, ids[3]: 3, ids[4]: 4, ids[2]: None, ids[0]: None}
    with sessions() as s:  # the running job ends: the pass places the head
        s.execute(update(Job).where(Job.id == ids[0]).values(state="succeeded"))
        s.execute(update(Gpu).values(job_id=None))
        s.commit()
        schedule(s, None)
    shown = {j["id"]: j["queue_position"] for j in client.get("/jobs").json()["data"]}
    assert shown[urgent["id"]] is None and [shown[i] for i in (ids[1], ids[3], ids[4])] == [1, 2, 3]
    queue = {e["id"]: e["queue_position"] for e in client.get("/queue").json()["data"]}
    assert {k: v for k, v in queue.items() if v is not None} == {ids[1]: 1, ids[3]: 2, ids[4]: 3}


def _debug_statements(client, sessions):  # pragma: no cover - a helper to print what a submit runs
    with statements(client.app.state.engine) as seen:
        client.post("/jobs", json=spec())
    for statement, rows in seen:
        print(rows, " ".join(statement.split())[:200])


def test_a_dataset_file_is_read_again_only_when_it_changed(client, settings, monkeypatch):
    """A sweep submits many jobs on one file: its first records are checked once, and again after the
    file changed (a bad line written since is caught)."""
    import json

    from api import validation

    reads = []
    real = validation.inspect_dataset
    monkeypatch.setattr(validation, "inspect_dataset", lambda *a, **k: reads.append(a[0]) or real(*a, **k))
    path = settings.data_root / "sweep.jsonl"
    path.write_text("".join(json.dumps({"text": f"line {i} " * 8}) + "\n" for i in range(50)))
    for _ in range(3):
        assert client.post("/jobs", json=spec(dataset={"path": "sweep.jsonl"})).status_code == 201
    assert reads == [path]
    with path.open("a") as f:
        f.write("{not json\n")
    r = client.post("/jobs", json=spec(dataset={"path": "sweep.jsonl"}))
    assert r.status_code == 422 and "line 51 is not valid JSON" in r.text
    assert reads == [path, path]


def test_reading_a_job_is_one_statement_and_a_page_leaves_the_specs(client):
    """GET /jobs/{id} reads one row (no session's extra statements); GET /jobs does not load each job's spec
    (the largest column, which a summary does not show)."""
    ids = [client.post("/jobs", json=spec()).json()["id"] for _ in range(3)]
    engine = client.app.state.engine
    assert client.get(f"/jobs/{ids[0]}").status_code == 200  # the caller's token is remembered from here on
    with statements(engine) as seen:
        got = client.get(f"/jobs/{ids[0]}").json()
    selects = [s for s, _ in seen if not s.startswith("BEGIN")]  # SQLite's BEGIN is a statement of ours
    assert len(selects) == 1 and "FROM jobs" in selects[0], seen
    assert got["spec"]["name"] == spec()["name"] and got["id"] == ids[0]
    with statements(engine) as seen:
        page = client.get("/jobs", params={"limit": 2}).json()
    assert len(page["data"]) == 2 and page["next_cursor"]
    assert [s for s, _ in seen if "jobs.spec" in s] == [], seen
