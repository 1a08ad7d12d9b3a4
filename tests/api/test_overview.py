"""GET /overview: the dashboard's one request per refresh says what /gpus, /queue, /jobs and /jobs/{id} say."""

from __future__ import annotations

from tests.api.conftest import make_user, spec
from tests.api.test_jobs import add_box, only_error


def without_clock(view: dict) -> dict:
    return {k: v for k, v in view.items() if k != "now"}


def test_overview_is_the_panels_in_one_response(client, sessions):
    add_box(sessions, n=2)
    running = client.post("/jobs", json=spec(gpus=2, deepspeed={"train_batch_size": 8})).json()
    waiting = client.post("/jobs", json=spec(name="second")).json()
    view = client.get("/overview", params={"job": waiting["id"]})
    assert view.status_code == 200, view.text
    body = view.json()
    assert body["user"] == {"name": "local", "is_admin": True}
    assert body["gpus"] == client.get("/gpus").json()
    assert body["queue"] == client.get("/queue").json()
    assert body["jobs"] == client.get("/jobs", params={"limit": 50}).json()
    assert body["job"] == client.get(f"/jobs/{waiting['id']}").json()
    # What the page shows: who holds the slots, and where the second job waits.
    assert [g["job"]["id"] for g in body["gpus"]["data"][0]["gpus"]] == [running["id"], running["id"]]
    assert [(q["name"], q["queue_position"]) for q in body["queue"]["data"]] == [("tiny-sft", None), ("second", 1)]
    assert client.get("/overview").json()["job"] is None


def test_overview_keeps_each_users_view(client, sessions):
    add_box(sessions, n=1)
    theirs = client.post("/jobs", json=spec(name="admins-job")).json()
    bob = make_user(client, "bob")
    mine = client.post("/jobs", json=spec(name="bobs-job"), headers=bob).json()
    body = client.get("/overview", headers=bob).json()
    assert body["user"] == {"name": "bob", "is_admin": False}
    assert [j["name"] for j in body["jobs"]["data"]] == ["bobs-job"]
    # The public queue: every job, the other user's without its id.
    assert {(q["name"], q["id"]) for q in body["queue"]["data"]} == {("admins-job", None), ("bobs-job", mine["id"])}
    assert client.get("/overview", params={"job": mine["id"]}, headers=bob).json()["job"]["name"] == "bobs-job"
    only_error(client.get("/overview", params={"job": theirs["id"]}, headers=bob), 404)
    only_error(client.get("/overview", params={"job": "../etc"}, headers=bob), 422)


def test_overview_needs_a_valid_token(client):
    only_error(client.get("/overview", headers={"Authorization": ""}), 401)
    only_error(client.get("/overview", headers={"Authorization": "Bearer nope"}), 401)


def test_dashboard_files_are_served_offline(client):
    page = client.get("/", headers={"Authorization": ""})
    assert page.status_code == 200 and "http://" not in page.text and "https://" not in page.text
    assert "Content-Security-Policy" in page.text and "script-src 'self'" in page.text
    for name, kind in [
        ("app.js", "text/javascript"),
        ("sse.js", "text/javascript"),
        ("charts.js", "text/javascript"),
        ("app.css", "text/css"),
        ("vendor/uplot/uPlot.iife.min.js", "text/javascript"),
        ("vendor/uplot/uPlot.min.css", "text/css"),
        ("vendor/uplot/LICENSE", "text/plain"),
    ]:
        r = client.get(f"/static/{name}", headers={"Authorization": ""})
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind), name
        assert r.headers["x-frame-options"] == "DENY"
        assert f"/static/{name}" in page.text or name.endswith("LICENSE")
    for name in ("../dashboard.py", "..%2fdashboard.py", "nope.js", ""):
        assert client.get(f"/static/{name}", headers={"Authorization": ""}).status_code == 404, name
