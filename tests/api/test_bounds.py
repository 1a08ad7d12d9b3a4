"""Numbers in queries and headers are bounded by what the columns and Redis hold: 422, never a 500
(SQLite cannot bind an integer over 2**63) nor a silent empty answer."""

from __future__ import annotations

from core import keys
from core.models import JobMetric
from tests.api.conftest import spec
from tests.api.test_events import read_all, set_state
from tests.api.test_jobs import only_error


def test_metrics_after_step_fits_the_step_column(client, sessions):
    job_id = client.post("/jobs", json=spec()).json()["id"]
    with sessions() as s:
        s.add(JobMetric(job_id=job_id, attempt=1, step=2**31 - 1, loss=1.0, time=1.0))
        s.commit()
    for bad in (2**31, 2**63, 2**64 + 5):
        [err] = only_error(client.get(f"/jobs/{job_id}/metrics", params={"after_step": bad}), 422)
        assert err["loc"] == ["query", "after_step"]
    assert [m["step"] for m in client.get(f"/jobs/{job_id}/metrics", params={"after_step": 2**31 - 2}).json()["data"]]
    assert client.get(f"/jobs/{job_id}/metrics", params={"after_step": 2**31 - 1}).json()["data"] == []


def test_resume_ids_beyond_redis_range_are_422(client):
    job_id = client.post("/jobs", json=spec()).json()["id"]
    for bad in (f"{2**64}-0:0", f"0-{2**64}:0", "99999999999999999999-1:0", f"1-0:{2**31}"):
        [err] = only_error(client.get(f"/jobs/{job_id}/events", headers={"Last-Event-ID": bad}), 422)
        assert err["loc"] == ["header", "Last-Event-ID"]
        [err] = only_error(client.get(f"/jobs/{job_id}/events", params={"after": bad}), 422)
        assert err["loc"] == ["query", "after"]
    # The largest ids are valid; with the stream gone (Redis lost it) the refill from the DB finds nothing
    # after them.
    set_state(client.app.state.sessions, job_id, "succeeded")
    client.app.state.sync_redis.delete(keys.job_events(job_id))
    for top in (f"{2**64 - 1}-{2**64 - 1}:0", f"1-{2**64 - 1}:{2**31 - 1}"):
        got = read_all(client, job_id, **{"Last-Event-ID": top})
        assert [e[1] for e in got] == ["end"], top
