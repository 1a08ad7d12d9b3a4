"""POST /tokens: a token never outlives the token that made it; a per-user cap on live tokens;
names are matched whole (no trailing newline)."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from core.users import create_token
from tests.api.conftest import make_user
from tests.api.test_jobs import only_error


def _expiring(client, user: str, days: float) -> tuple[dict[str, str], datetime]:
    with client.app.state.sessions() as s:
        row, token = create_token(s, user_name=user, name="short", expires_in=timedelta(days=days))
        return {"Authorization": f"Bearer {token}"}, row.expires_at


def test_a_token_made_with_an_expiring_token_expires_no_later(client):
    make_user(client, "ann")
    short, until = _expiring(client, "ann", 1)
    for body in ({"name": "forever"}, {"name": "longer", "expires_in_days": 30}):
        r = client.post("/tokens", json=body, headers=short)
        assert r.status_code == 201, r.text
        assert r.json()["expires_at"] is not None, body
        assert datetime.fromisoformat(r.json()["expires_at"]) <= until, body
        child = {"Authorization": f"Bearer {r.json()['token']}"}
        grandchild = client.post("/tokens", json={"name": "again"}, headers=child).json()
        assert datetime.fromisoformat(grandchild["expires_at"]) <= until
    shorter = client.post("/tokens", json={"name": "hour", "expires_in_days": 1 / 24}, headers=short).json()
    assert datetime.fromisoformat(shorter["expires_at"]) < until - timedelta(hours=20)


def test_a_token_that_never_expires_may_make_one_that_never_expires(client):
    ann = make_user(client, "ann")
    r = client.post("/tokens", json={"name": "ci"}, headers=ann)
    assert r.status_code == 201 and r.json()["expires_at"] is None


def test_live_tokens_per_user_are_capped(client):
    ann = make_user(client, "ann")  # one live token
    assert client.patch("/users/ann", json={"max_tokens": 3}).status_code == 200
    made = [client.post("/tokens", json={"name": f"t{i}"}, headers=ann).json() for i in range(2)]
    assert all("token" in t for t in made)
    [err] = only_error(client.post("/tokens", json={"name": "one too many"}, headers=ann), 403)
    assert err["type"] == "limit_exceeded" and "3 live tokens" in err["msg"], err
    assert "TRAINBOX_MAX_TOKENS_PER_USER" in err["msg"] and "--max-tokens" in err["msg"]
    assert len(client.get("/tokens", headers=ann).json()) == 3
    assert client.delete(f"/tokens/{made[0]['id']}", headers=ann).status_code == 204
    assert client.post("/tokens", json={"name": "after revoking one"}, headers=ann).status_code == 201
    assert client.get("/users/me", headers=ann).json()["limits"]["max_tokens"] == 3


@pytest.mark.parametrize("name", ["evil\n", "a" * 100 + "\n", "\u00aa", "caf\u00e9"])
def test_names_with_a_trailing_newline_are_422(client, name):
    """Whole-name matching; and ASCII only, as the schema's pattern states (its \\w is ASCII)."""
    ann = make_user(client, "ann")
    only_error(client.post("/tokens", json={"name": name}, headers=ann), 422)
    only_error(client.patch("/users/ann%0A", json={"max_gpus": 1}), 422)
    assert [t["name"] for t in client.get("/tokens", headers=ann).json()] == ["default"]


def test_a_lifetime_is_a_json_number(client):
    """Strict as the schema says: 90 and 0.5 are days; true and "90" are not (found by schemathesis)."""
    ann = make_user(client, "ann")
    assert client.post("/tokens", json={"name": "a", "expires_in_days": 90}, headers=ann).status_code == 201
    assert client.post("/tokens", json={"name": "b", "expires_in_days": 0.5}, headers=ann).status_code == 201
    for bad in (True, "90"):
        only_error(client.post("/tokens", json={"name": "c", "expires_in_days": bad}, headers=ann), 422)
