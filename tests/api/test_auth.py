"""Bearer tokens on every route but /healthz; users A and B keep their jobs apart; admins see all."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest
from sqlalchemy import select, text

from core.models import ApiToken, Job, JobMetric
from core.users import create_token, revoke_token
from tests.api.conftest import make_user, spec
from tests.api.test_jobs import add_box, only_error


def _no_jobs(sessions) -> None:
    with sessions() as s:
        assert s.scalars(select(Job)).all() == [], "nothing may be stored"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/jobs"),
        ("POST", "/jobs/validate"),
        ("GET", "/jobs"),
        ("GET", "/jobs/j0000000000000000"),
        ("POST", "/jobs/j0000000000000000/cancel"),
        ("GET", "/jobs/j0000000000000000/events"),
        ("GET", "/jobs/j0000000000000000/logs"),
        ("GET", "/jobs/j0000000000000000/metrics"),
        ("GET", "/jobs/j0000000000000000/artifacts"),
        ("GET", "/jobs/j0000000000000000/artifacts/model/config.json"),
        ("GET", "/gpus"),
        ("GET", "/queue"),
        ("GET", "/datasets"),
        ("POST", "/datasets"),
        ("GET", "/users/me"),
        ("GET", "/metrics"),
    ],
)
def test_every_route_needs_a_token(client, sessions, dispatched, method, path):
    kwargs = {"json": spec()} if method == "POST" and path == "/jobs" else {}
    for headers in ({"Authorization": ""}, {"Authorization": "Basic dXNlcjpwYXNz"}):
        [err] = only_error(client.request(method, path, headers=headers, **kwargs), 401)
        assert err["type"] == "unauthorized" and "missing bearer token" in err["msg"]
    r = client.request(method, path, headers={"Authorization": "Bearer tbx_nope"}, **kwargs)
    [err] = only_error(r, 401)
    assert err["msg"] == "invalid, revoked or expired token" and r.headers["WWW-Authenticate"] == "Bearer"
    _no_jobs(sessions)
    assert dispatched.calls == []


def test_public_routes(client):
    anonymous = {"Authorization": ""}
    assert client.get("/healthz", headers=anonymous).status_code == 200
    page = client.get("/", headers=anonymous)
    assert page.status_code == 200 and '<script src="/static/app.js"' in page.text
    script = client.get("/static/app.js", headers=anonymous)  # the page sends the token itself
    assert script.status_code == 200 and 'Authorization: "Bearer "' in script.text
    spec_doc = client.get("/openapi.json", headers=anonymous).json()
    assert spec_doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_wrong_secret_revoked_and_expired_tokens(client, sessions):
    headers = make_user(client, "ann")
    token = headers["Authorization"].removeprefix("Bearer ")
    assert client.get("/users/me", headers=headers).json()["name"] == "ann"
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    only_error(client.get("/users/me", headers={"Authorization": f"Bearer {forged}"}), 401)
    # Revoked through the API: 401 at the next request (this process forgets its cached tokens).
    assert client.delete(f"/tokens/{token.split('_')[1]}", headers=headers).status_code == 204
    only_error(client.get("/users/me", headers=headers), 401)
    with sessions() as s:
        row, short = create_token(s, user_name="ann", expires_in=timedelta(seconds=60))
        row.expires_at = row.created_at - timedelta(seconds=1)
        s.commit()
    only_error(client.get("/users/me", headers={"Authorization": f"Bearer {short}"}), 401)


def test_a_token_revoked_elsewhere_stops_working_within_the_cache_bound(client, sessions, monkeypatch):
    """Revoked outside this API process (trainbox-admin, another replica): the token works until its
    cached look-up is TRAINBOX_AUTH_CACHE_S old, then never again; an expiry is honoured at once."""
    import time

    from tests.helpers import wait_for

    monkeypatch.setattr(client.app.state.auth_cache, "ttl_s", 1.0)
    headers = make_user(client, "ann")
    token = headers["Authorization"].removeprefix("Bearer ")
    assert client.get("/users/me", headers=headers).status_code == 200  # looked up, and remembered
    with sessions() as s:
        revoke_token(s, token.split("_")[1])
    revoked_at = time.monotonic()
    wait_for(lambda: client.get("/users/me", headers=headers).status_code == 401, timeout=5, what="401")
    assert time.monotonic() - revoked_at <= 1.0 + 0.5, "within the bound"
    for _ in range(3):
        only_error(client.get("/users/me", headers=headers), 401)
    # A token that expires while cached is refused from its expiry, not the cache's.
    with sessions() as s:
        row, short = create_token(s, user_name="ann", expires_in=timedelta(seconds=60))
    monkeypatch.setattr(client.app.state.auth_cache, "ttl_s", 60.0)
    auth = {"Authorization": f"Bearer {short}"}
    assert client.get("/users/me", headers=auth).status_code == 200
    cached = client.app.state.auth_cache.get(short)
    assert cached is not None
    assert client.app.state.auth_cache.get(short, now=cached.token_expires_at) is None


def test_tokens_are_stored_hashed_and_secrets_appear_nowhere(client, sessions, settings, caplog):
    caplog.set_level(logging.DEBUG)
    headers = make_user(client, "ann")
    token = headers["Authorization"].removeprefix("Bearer ")
    secret = token.split("_", 2)[2]
    job = client.post("/jobs", json=spec(), headers=headers).json()
    client.get("/jobs", headers={"Authorization": f"Bearer {token}x"})  # a failed attempt is not logged either
    with sessions() as s:
        [row] = s.scalars(select(ApiToken).where(ApiToken.id == token.split("_")[1])).all()
        assert row.secret_hash != secret and len(row.secret_hash) == 64
        dump = []
        for table in ("users", "api_tokens", "jobs", "job_metrics", "datasets"):
            dump += [str(tuple(r)) for r in s.execute(text(f"SELECT * FROM {table}"))]
    everything = "\n".join(dump)
    assert secret not in everything and token not in everything
    assert secret not in caplog.text
    assert secret not in str(client.get(f"/jobs/{job['id']}", headers=headers).json())


def test_a_user_cannot_see_follow_cancel_or_download_anothers_job(client, sessions, settings):
    a, b = make_user(client, "ann"), make_user(client, "bob")
    job = client.post("/jobs", json=spec(name="bobs"), headers=b).json()
    jid = job["id"]
    run = settings.run_dir(jid)
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text("{}")
    (run / "train.log").write_text("bob's log\n")
    with sessions() as s:
        s.add(JobMetric(job_id=jid, attempt=1, step=1, loss=1.0, time=1.0))
        s.commit()
    for method, path in [
        ("GET", f"/jobs/{jid}"),
        ("GET", f"/jobs/{jid}/events"),
        ("GET", f"/jobs/{jid}/logs"),
        ("GET", f"/jobs/{jid}/metrics"),
        ("GET", f"/jobs/{jid}/artifacts"),
        ("GET", f"/jobs/{jid}/artifacts/model/config.json"),
        ("POST", f"/jobs/{jid}/cancel"),
    ]:
        [err] = only_error(client.request(method, path, headers=a), 404)
        assert err == {"loc": ["path", "job_id"], "msg": f"job {jid!r} not found", "type": "not_found"}, path
    assert client.get(f"/jobs/{jid}", headers=b).json()["state"] == "queued", "ann's cancel changed nothing"
    # Listing: ann's list holds only her jobs, even when she filters by bob.
    assert client.get("/jobs", headers=a).json()["data"] == []
    assert client.get("/jobs", params={"owner": "bob"}, headers=a).json() == {"data": [], "next_cursor": None}
    # The owner and admins (the default client is admin `local`) see, follow and download it.
    for headers in (b, client.headers):
        assert client.get(f"/jobs/{jid}", headers=headers).status_code == 200
        assert client.get(f"/jobs/{jid}/logs", headers=headers).text == "bob's log\n"
        assert client.get(f"/jobs/{jid}/metrics", headers=headers).json()["data"][0]["step"] == 1
        assert client.get(f"/jobs/{jid}/artifacts/model/config.json", headers=headers).content == b"{}"
    assert [j["id"] for j in client.get("/jobs", params={"owner": "bob"}).json()["data"]] == [jid]
    r = client.post(f"/jobs/{jid}/cancel")
    assert r.status_code == 202 and r.json()["state"] == "cancelled"
    with client.stream("GET", f"/jobs/{jid}/events") as stream:
        assert stream.status_code == 200 and "cancelled" in stream.read().decode()


def test_owner_cancels_their_own(client):
    a = make_user(client, "ann")
    job = client.post("/jobs", json=spec(), headers=a).json()
    assert client.post(f"/jobs/{job['id']}/cancel", headers=a).json()["state"] == "cancelled"


def test_queue_and_gpus_show_every_job_but_ids_only_to_those_who_may_open_them(client, sessions):
    add_box(sessions, n=1)
    a, b = make_user(client, "ann"), make_user(client, "bob")
    running = client.post("/jobs", json=spec(name="bob-running"), headers=b).json()
    waiting = client.post("/jobs", json=spec(name="ann-waiting"), headers=a).json()
    view = client.get("/queue", headers=a).json()["data"]
    assert [(e["name"], e["owner"], e["state"], e["queue_position"]) for e in view] == [
        ("bob-running", "bob", "starting", None),
        ("ann-waiting", "ann", "queued", 1),
    ]
    assert [e["id"] for e in view] == [None, waiting["id"]]
    [gpu] = client.get("/gpus", headers=a).json()["data"][0]["gpus"]
    assert gpu["job"] == {"id": None, "name": "bob-running", "owner": "bob", "state": "starting"}
    assert [e["id"] for e in client.get("/queue").json()["data"]] == [running["id"], waiting["id"]]


def test_users_me_and_admin_limits(client):
    a = make_user(client, "ann")
    me = client.get("/users/me", headers=a).json()
    assert me == {
        "name": "ann",
        "is_admin": False,
        "limits": {
            "max_gpus": None,
            "max_queued": 50,
            "max_runtime_s": 604800,
            "max_priority": 0,
            "submit_rate_per_minute": 10000,
            "max_datasets": 100,
            "max_dataset_bytes": 10 << 30,
            "max_tokens": 20,
            "max_disk_bytes": None,
        },
        "disk": {"jobs_bytes": 0, "uploads_bytes": 0, "total_bytes": 0},
    }
    [err] = only_error(client.patch("/users/ann", json={"max_gpus": 1}, headers=a), 403)
    assert err["msg"] == "only an admin may do this"
    only_error(client.get("/users", headers=a), 403)
    r = client.patch("/users/ann", json={"max_gpus": 1, "max_priority": 3})
    assert r.status_code == 200 and r.json()["limits"]["max_gpus"] == 1
    assert client.get("/users/me", headers=a).json()["limits"]["max_priority"] == 3
    assert client.patch("/users/ann", json={"max_gpus": None}).json()["limits"]["max_gpus"] is None
    only_error(client.patch("/users/nobody", json={"max_gpus": 1}), 404)
    only_error(client.patch("/users/ann", json={"max_gpus": 0}), 422)
    assert {u["name"] for u in client.get("/users").json()} == {"local", "ann"}


def test_metrics_can_be_made_public_for_a_private_scrape_network(client, settings):
    from fastapi.testclient import TestClient

    from api.app import create_app

    assert client.get("/metrics").status_code == 200  # with a token
    app = create_app(settings.model_copy(update={"metrics_public": True}), dispatch=None)
    with TestClient(app) as anonymous:
        assert "trainbox_jobs" in anonymous.get("/metrics").text
        only_error(anonymous.get("/jobs"), 401)
    app.state.engine.dispose()


def test_users_manage_their_own_tokens(client, sessions):
    ann, bob = make_user(client, "ann"), make_user(client, "bob")
    r = client.post("/tokens", json={"name": "ci runner", "expires_in_days": 30}, headers=ann)
    assert r.status_code == 201, r.text
    new = r.json()
    assert new["user"] == "ann" and new["state"] == "active" and new["token"].startswith("tbx_") and new["expires_at"]
    fresh = {"Authorization": f"Bearer {new['token']}"}
    assert client.get("/users/me", headers=fresh).json()["name"] == "ann"
    listed = client.get("/tokens", headers=ann).json()
    assert [t["name"] for t in listed] == ["default", "ci runner"] and all("token" not in t for t in listed)
    # bob can neither see nor revoke ann's token; the answer does not confirm that it exists.
    assert client.get("/tokens", headers=bob).json()[0]["user"] == "bob"
    [err] = only_error(client.delete(f"/tokens/{new['id']}", headers=bob), 404)
    assert err["msg"] == f"no token with id {new['id']!r}"
    assert client.get("/users/me", headers=fresh).status_code == 200
    assert client.delete(f"/tokens/{new['id']}", headers=ann).status_code == 204
    only_error(client.get("/users/me", headers=fresh), 401)
    assert client.get("/tokens", headers=ann).json()[1]["state"] == "revoked"
    only_error(client.post("/tokens", json={"name": "x", "secret": "mine"}, headers=ann), 422)


def _post_headers_only(
    url: str, headers: dict[str, str], length: int, first: bytes, wait_s: float = 5
) -> tuple[int, float]:
    """Send an upload's headers and the start of its body, never the rest; (status, seconds to the answer)."""
    import socket
    import time
    from urllib.parse import urlparse

    host, port = urlparse(url).hostname, urlparse(url).port
    with socket.create_connection((host, port), timeout=wait_s) as sock:
        head = f"POST /datasets HTTP/1.1\r\nHost: {host}\r\nContent-Length: {length}\r\n"
        head += "Content-Type: multipart/form-data; boundary=b0undary\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        start = time.monotonic()
        sock.sendall(head.encode() + first)
        reply = b""
        try:
            while b"\r\n\r\n" not in reply and (chunk := sock.recv(65536)):
                reply += chunk
        except TimeoutError:
            raise AssertionError("no answer while the body was unsent: the server waited to read it") from None
        return int(reply.split(b" ", 2)[1]), time.monotonic() - start


def test_an_upload_is_authenticated_before_its_body_is_read(client, settings):
    """200 MiB announced, 64 KiB sent: without a valid token the 401 comes at once; nothing is spooled."""
    from api.app import create_app
    from tests.helpers import serve

    big = settings.model_copy(update={"max_upload_bytes": 256 << 20})
    first = b'--b0undary\r\nContent-Disposition: form-data; name="file"; filename="x.jsonl"\r\n\r\n' + b"x" * 65536
    with serve(create_app(big, dispatch=None)) as url:
        unknown = "Bearer tbx_" + "a" * 12 + "_" + "b" * 43
        for headers in ({}, {"Authorization": "Bearer tbx_nope"}, {"Authorization": unknown}):
            status, took = _post_headers_only(url, headers, 200 << 20, first)
            assert (status, took < 3) == (401, True), (headers, status, took)
        # A valid token is still answered by the route (here: it waits for the body, which never comes).
        with pytest.raises(AssertionError, match="no answer"):
            _post_headers_only(url, {"Authorization": client.headers["Authorization"]}, 200 << 20, first, wait_s=2)
