"""GET /gpus, /healthz, /metrics, the dashboard, OpenAPI, and the real Celery dispatch path."""

from __future__ import annotations

from redis import Redis

from core import keys
from core.dispatch import celery_dispatcher
from tests.api.conftest import REDIS_URL, spec
from tests.api.test_jobs import add_box


def test_gpus_view(client, sessions):
    assert client.get("/gpus").json() == {"data": [], "total": 0, "in_use": 0}
    add_box(sessions, n=3)
    job = client.post("/jobs", json=spec(gpus=2, deepspeed={"train_batch_size": 8})).json()
    view = client.get("/gpus").json()
    assert (view["total"], view["in_use"]) == (3, 2)
    [box] = view["data"]
    assert box["name"] == "box1" and box["queue"] == "trainbox.box.box1"
    holders = [g["job"]["id"] if g["job"] else None for g in box["gpus"]]
    assert holders == [job["id"], job["id"], None]
    assert box["gpus"][0]["memory_mb"] == 24564 and box["gpus"][0]["job"]["owner"] == "local"


def test_healthz(client):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok", "database": "ok", "redis": "ok"}


def test_prometheus_metrics(client, sessions):
    add_box(sessions, n=2)
    client.post("/jobs", json=spec())
    client.post("/jobs", json=spec())
    client.post("/jobs", json=spec())
    client.get("/jobs/j0000000000000000")
    text = client.get("/metrics").text
    assert 'trainbox_jobs{state="starting"} 2.0' in text
    assert 'trainbox_jobs{state="queued"} 1.0' in text
    assert 'trainbox_gpus{use="in_use"} 2.0' in text
    assert 'trainbox_http_requests_total{method="POST",route="/jobs",status="201"}' in text
    assert 'route="/jobs/{job_id}",status="404"' in text


def test_dashboard_and_docs(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<script" in page.text and "http://" not in page.text and "https://" not in page.text
    # Swagger UI and ReDoc would load from a CDN (nothing offline): off; the OpenAPI document is public.
    for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        assert client.get(path, headers={"Authorization": ""}).status_code == 404, path
    doc = client.get("/openapi.json", headers={"Authorization": ""})
    assert doc.status_code == 200 and "cdn" not in doc.text.lower()
    paths = doc.json()["paths"]
    assert {
        "/jobs",
        "/jobs/validate",
        "/jobs/{job_id}",
        "/jobs/{job_id}/cancel",
        "/jobs/{job_id}/events",
    } <= set(paths)


def test_celery_dispatch_reaches_the_box_queue():
    """The default dispatch publishes run_job(job_id, attempt) on the box's queue in Redis."""
    queue = keys.box_queue("dispatch-test")
    r = Redis.from_url(REDIS_URL)
    r.delete(queue)
    try:
        celery_dispatcher(REDIS_URL)("j123", 2, queue)
        assert r.llen(queue) == 1
        import json

        message = json.loads(r.lpop(queue))
        assert message["headers"]["task"] == keys.RUN_JOB_TASK
        assert message["headers"]["argsrepr"] in ("['j123', 2]", "('j123', 2)")
    finally:
        r.delete(queue, *r.keys(f"_kombu.binding*{queue}*"))
        r.close()


def test_healthz_reports_a_dead_redis_and_a_missing_one(settings, client):
    from fastapi.testclient import TestClient

    from api.app import create_app

    dead = create_app(settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"}), dispatch=None)
    with TestClient(dead, headers=client.headers) as c:
        r = c.get("/healthz")
        assert r.status_code == 503 and r.json()["redis"].startswith("error") and r.json()["database"] == "ok"
        [err] = c.get("/jobs/j0000000000000000/events").json()["detail"]
        assert err["type"] == "not_found"
    dead.state.engine.dispose()
    none = create_app(settings.model_copy(update={"redis_url": None}), dispatch=None)
    with TestClient(none, headers=client.headers) as c:
        assert c.get("/healthz").json() == {"status": "ok", "database": "ok", "redis": "not configured"}
        job_id = c.post("/jobs", json=spec()).json()["id"]
        r = c.get(f"/jobs/{job_id}/events")
        assert r.status_code == 503 and "TRAINBOX_REDIS_URL" in r.json()["detail"][0]["msg"]
    none.state.engine.dispose()


def test_unexpected_errors_keep_the_error_shape(settings, client):
    from fastapi.testclient import TestClient

    from api.app import create_app

    app = create_app(settings, dispatch=None)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret internals")

    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/boom")
    assert r.status_code == 500
    assert r.json() == {"detail": [{"loc": [], "msg": "internal server error", "type": "internal_error"}]}
    app.state.engine.dispose()


def test_module_level_app_for_uvicorn(tmp_path, monkeypatch):
    """`uvicorn api.app:app` builds the app from the TRAINBOX_ environment on first access."""
    import api.app as module
    from core.settings import get_settings

    monkeypatch.setenv("TRAINBOX_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("TRAINBOX_REDIS_URL", REDIS_URL)
    monkeypatch.setattr(module, "_app", None)
    get_settings.cache_clear()
    try:
        app = module.app
        assert app is module.app and app.state.settings.data_dir == tmp_path
        app.state.engine.dispose()
    finally:
        get_settings.cache_clear()


def test_gpus_view_shows_a_gpu_used_outside_trainbox(client, sessions):
    from sqlalchemy import update

    from core.models import Gpu

    add_box(sessions, n=2)
    with sessions() as s:
        s.execute(update(Gpu).where(Gpu.index == 1).values(busy=True))
        s.commit()
    [box] = client.get("/gpus").json()["data"]
    assert [(g["index"], g["busy"], g["job"]) for g in box["gpus"]] == [(0, False, None), (1, True, None)]
    job = client.post("/jobs", json=spec(gpus=1)).json()
    assert job["gpu_ids"] == [0] and client.post("/jobs", json=spec(gpus=1)).json()["state"] == "queued"


def test_queued_jobs_show_a_start_eta(client, sessions):
    add_box(sessions, n=1)
    running = client.post("/jobs", json=spec(gpus=1)).json()
    queued = client.post("/jobs", json=spec(gpus=1)).json()
    assert running["start_eta_s"] is None and queued["queue_position"] == 1
    assert client.get(f"/jobs/{queued['id']}").json()["start_eta_s"] is None, "the holder has no ETA yet"
    entries = {e["id"]: e for e in client.get("/queue").json()["data"]}
    assert "start_eta_s" in entries[queued["id"]]


def test_no_response_can_be_framed(client):
    """The dashboard's cancel button must not be clickjacked: every response forbids framing."""
    anonymous = {"Authorization": ""}
    responses = [
        client.get("/", headers=anonymous),
        client.get("/healthz", headers=anonymous),
        client.get("/openapi.json", headers=anonymous),
        client.get("/jobs", headers=anonymous),  # 401
        client.get("/jobs/j0000000000000000"),  # 404
        client.post("/datasets", headers=anonymous),  # 401 from the upload check
        client.get("/jobs"),
    ]
    for r in responses:
        assert r.headers["X-Frame-Options"] == "DENY", r.request.url
        assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"], r.request.url
        assert r.headers["X-Content-Type-Options"] == "nosniff"
