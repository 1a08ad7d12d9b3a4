"""Users and tokens: format, hashing, expiry, revocation, limits, and the local admin's token file."""

from __future__ import annotations

import stat
from datetime import timedelta

import pytest

from core import users
from core.models import ApiToken
from core.settings import Settings


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(data_dir=tmp_path, max_gpus_per_user=4, max_priority=1)


def test_token_is_long_random_shown_once_and_stored_as_its_hash(session, settings):
    users.create_user(session, name="ann")
    row, token = users.create_token(session, user_name="ann", name="laptop")
    prefix, token_id, secret = token.split("_", 2)
    assert prefix == "tbx" and token_id == row.id and len(secret) == 43
    stored = session.get(ApiToken, row.id)
    assert stored.secret_hash == users.hash_secret(secret) and secret not in stored.secret_hash
    who = users.authenticate(session, token, settings)
    assert who is not None and who.name == "ann" and not who.is_admin
    _, other = users.create_token(session, user_name="ann")
    assert other != token


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t + "x",
        lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"),
        lambda t: t.replace("tbx_", "xyz_"),
        lambda t: "",
        lambda t: "tbx_" + "a" * 12,
    ],
)
def test_malformed_or_wrong_tokens_authenticate_nobody(session, settings, mangle):
    users.create_user(session, name="ann")
    _, token = users.create_token(session, user_name="ann")
    assert users.authenticate(session, mangle(token), settings) is None


def test_revoked_and_expired_tokens(session, settings):
    users.create_user(session, name="ann")
    row, token = users.create_token(session, user_name="ann", expires_in=timedelta(hours=1))
    assert users.token_status(row) == "active"
    assert users.token_status(row, row.created_at + timedelta(hours=2)) == "expired"
    users.revoke_token(session, row.id)
    assert users.authenticate(session, token, settings) is None
    assert users.token_status(session.get(ApiToken, row.id)) == "revoked"
    with pytest.raises(users.UserError, match="no token"):
        users.revoke_token(session, "nope")
    with pytest.raises(users.UserError, match="positive"):
        users.create_token(session, user_name="ann", expires_in=timedelta(0))


def test_user_names_and_duplicates(session):
    users.create_user(session, name="ann")
    with pytest.raises(users.UserError, match="already exists"):
        users.create_user(session, name="ann")
    with pytest.raises(users.UserError, match="user names are"):
        users.create_user(session, name="bad name")
    with pytest.raises(users.UserError, match="no user"):
        users.create_token(session, user_name="nobody")


def test_limits_come_from_settings_unless_overridden(session, settings):
    users.create_user(session, name="ann")
    users.create_user(session, name="root", is_admin=True)
    users.set_limits(session, name="ann", max_queued=3, max_priority=5)
    ann = users.effective_limits(users.get_user(session, "ann"), settings)
    assert (ann.max_gpus, ann.max_queued, ann.max_priority) == (4, 3, 5)
    assert users.effective_limits(users.get_user(session, "root"), settings).max_priority is None
    users.set_limits(session, name="ann", max_queued=None)
    assert users.effective_limits(users.get_user(session, "ann"), settings).max_queued == settings.max_queued_per_user
    with pytest.raises(users.UserError, match="at least 1"):
        users.set_limits(session, name="ann", max_gpus=0)


def test_local_admin_token_file_is_0600_kept_and_replaced_when_revoked(session, settings):
    assert users.ensure_local_token(session, settings) is True
    path = settings.token_file
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = path.read_text().strip()
    who = users.authenticate(session, token, settings)
    assert who is not None and who.name == users.LOCAL_ADMIN and who.is_admin
    assert users.ensure_local_token(session, settings) is False and path.read_text().strip() == token
    users.revoke_token(session, token.split("_")[1])
    assert users.ensure_local_token(session, settings) is True
    assert path.read_text().strip() != token and stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize("name", ["evil\n", "a" * 100 + "\n", "ann\r\n"])
def test_names_may_not_end_with_a_newline(session, name):
    """`$` matches before a final newline: "evil\\n" passed, and 101 characters went into a 100-char column."""
    with pytest.raises(users.UserError, match="user names are"):
        users.create_user(session, name=name)
    users.create_user(session, name="ann")
    with pytest.raises(users.UserError, match="token names are"):
        users.create_token(session, user_name="ann", name=name)
    assert [u.name for u in users.list_users(session)] == ["ann"] and users.list_tokens(session) == []


def test_a_cap_on_live_tokens_counts_neither_revoked_nor_expired_ones(session):
    users.create_user(session, name="ann")
    first, _ = users.create_token(session, user_name="ann", max_live=2)
    users.create_token(session, user_name="ann", max_live=2)
    with pytest.raises(users.TokenLimitReached, match="2 live tokens"):
        users.create_token(session, user_name="ann", max_live=2)
    users.revoke_token(session, first.id)
    users.create_token(session, user_name="ann", max_live=2)
    users.create_token(session, user_name="ann")  # no cap given (the admin CLI on the server)
    assert len(users.list_tokens(session, user_name="ann")) == 4
