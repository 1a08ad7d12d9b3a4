"""Users, their API tokens and their limits: what the API's auth and the admin CLI share.

A token is `tbx_<id>_<secret>`: the id is public (it names the token when listing or revoking),
the secret is 32 random bytes shown once. Only SHA-256(secret) is stored; a salt or a slow hash buys
nothing for a secret with 256 bits of entropy. The stored hash is compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, joinedload, selectinload

from core.models import ApiToken, User, utcnow
from core.settings import Settings

TOKEN_PREFIX = "tbx"
# Matched with fullmatch: `$` also matches before a final newline ("evil\n" would pass, 101 characters).
USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,99}")
# ASCII only: the API states this as a JSON Schema pattern, where \w means [A-Za-z0-9_].
TOKEN_NAME = re.compile(r"[A-Za-z0-9_ .@:()-]{1,100}")
_ID_CHARS = "0123456789abcdefghjkmnpqrstvwxyz"
_TOKEN = re.compile(rf"{TOKEN_PREFIX}_([{_ID_CHARS}]{{12}})_([A-Za-z0-9_-]{{43}})")
LIMIT_FIELDS = (
    "max_gpus",
    "max_queued",
    "max_runtime_s",
    "max_priority",
    "submit_rate_per_minute",
    "max_datasets",
    "max_dataset_bytes",
    "max_tokens",
    "max_disk_bytes",
)
LOCAL_ADMIN = "admin"


class UserError(ValueError):
    """A user or token operation that cannot be done (unknown name, duplicate, bad value)."""


class TokenLimitReached(UserError):
    """The user already has as many live (not revoked, not expired) tokens as they may."""

    def __init__(self, live: int) -> None:
        super().__init__(f"you have {live} live tokens, the most you may have; revoke one first")
        self.live = live


@dataclass(frozen=True)
class Limits:
    """A user's effective limits (per-user override, else the setting); None: no cap."""

    max_gpus: int | None
    max_queued: int
    max_runtime_s: int
    max_priority: int | None  # None for admins: the priority ceiling is for non-admins
    submit_rate_per_minute: int
    max_datasets: int = 0
    max_dataset_bytes: int = 0
    max_tokens: int = 0
    max_disk_bytes: int | None = None  # run directories and uploads together


@dataclass(frozen=True)
class Principal:
    """Who is asking: the authenticated user of a request."""

    id: int
    name: str
    is_admin: bool
    limits: Limits
    # When the token of this request expires (None: never); tokens it makes may not outlive it.
    token_expires_at: datetime | None = None

    def can_see(self, owner: str) -> bool:
        """Owners see their own jobs and uploads; admins see everyone's."""
        return self.is_admin or owner == self.name


def setting_name(limit: str) -> str:
    """The setting a limit defaults to (TRAINBOX_ + it, upper case): `<limit>_per_user` where there is one."""
    return f"{limit}_per_user" if f"{limit}_per_user" in Settings.model_fields else limit


def effective_limits(user: User, settings: Settings) -> Limits:
    """Each limit: the user's override, else its setting; admins have no priority ceiling."""
    limits = {
        f: getattr(settings, setting_name(f)) if getattr(user, f) is None else getattr(user, f) for f in LIMIT_FIELDS
    }
    return Limits(**limits | ({"max_priority": None} if user.is_admin else {}))


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


# --- users ---------------------------------------------------------------------------------------


def create_user(session: Session, *, name: str, is_admin: bool = False) -> User:
    """Add a user and commit; UserError if the name is taken or not a valid name."""
    if not USER_NAME.fullmatch(name):
        raise UserError("user names are 1-100 letters, digits, '.', '_', '@' or '-', starting with a letter or digit")
    user = User(name=name, is_admin=is_admin, created_at=utcnow())
    session.add(user)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise UserError(f"user {name!r} already exists") from None
    return user


def get_user(session: Session, name: str, *, lock: bool = False) -> User:
    """The user; `lock`: their row, locked until the transaction ends (Postgres: FOR UPDATE; SQLite's
    writing transactions already hold the database's write lock): per-user caps are counted under it."""
    query = select(User).where(User.name == name)
    user = session.scalar(query.with_for_update() if lock else query)
    if user is None:
        raise UserError(f"no user named {name!r}")
    return user


def list_users(session: Session) -> list[User]:
    return list(session.scalars(select(User).order_by(User.name)))


def set_limits(session: Session, *, name: str, is_admin: bool | None = None, **limits: int | None) -> User:
    """Override a user's limits (a value of None goes back to the setting) and commit."""
    user = get_user(session, name)
    for field, value in limits.items():
        if field not in LIMIT_FIELDS:
            raise UserError(f"unknown limit {field!r}; limits: {', '.join(LIMIT_FIELDS)}")
        if value is not None and field != "max_priority" and value < 1:
            raise UserError(f"{field} must be at least 1")
        if value is not None and field == "max_priority" and not -100 <= value <= 100:
            raise UserError("max_priority must be between -100 and 100")
        setattr(user, field, value)
    if is_admin is not None:
        user.is_admin = is_admin
    session.commit()
    return user


# --- tokens --------------------------------------------------------------------------------------


def live_tokens(session: Session, user_id: int, now: datetime | None = None) -> int:
    """How many of the user's tokens still authenticate (neither revoked nor expired)."""
    now = now or utcnow()
    live = (ApiToken.user_id == user_id) & ApiToken.revoked_at.is_(None)
    live &= or_(ApiToken.expires_at.is_(None), ApiToken.expires_at > now)
    return session.scalar(select(func.count()).select_from(ApiToken).where(live)) or 0


def create_token(
    session: Session,
    *,
    user_name: str,
    name: str = "default",
    expires_in: timedelta | None = None,
    not_after: datetime | None = None,
    max_live: int | None = None,
) -> tuple[ApiToken, str]:
    """A new token for the user, committed; returns the row and the token (shown once, never stored).

    `not_after`: the token expires then at the latest (a token made with an expiring token may not
    outlive it); `max_live`: TokenLimitReached if the user already has that many live tokens.
    """
    if not TOKEN_NAME.fullmatch(name):
        raise UserError("token names are 1-100 letters, digits, spaces or . @ : ( ) - _")
    if expires_in is not None and expires_in.total_seconds() <= 0:
        raise UserError("a token's lifetime must be positive")
    user = get_user(session, user_name, lock=True)
    now = utcnow()
    if max_live is not None and (live := live_tokens(session, user.id, now)) >= max_live:
        session.rollback()
        raise TokenLimitReached(live)
    expires_at = now + expires_in if expires_in else None
    if not_after is not None and (expires_at is None or expires_at > not_after):
        expires_at = not_after
    token_id = "".join(secrets.choice(_ID_CHARS) for _ in range(12))
    secret = secrets.token_urlsafe(32)
    row = ApiToken(
        id=token_id,
        user_id=user.id,
        name=name,
        secret_hash=hash_secret(secret),
        created_at=now,
        expires_at=expires_at,
    )
    session.add(row)
    session.commit()
    return row, f"{TOKEN_PREFIX}_{token_id}_{secret}"


def list_tokens(session: Session, *, user_name: str | None = None) -> list[ApiToken]:
    query = select(ApiToken).options(selectinload(ApiToken.user)).order_by(ApiToken.created_at)
    if user_name is not None:
        query = query.where(ApiToken.user_id == get_user(session, user_name).id)
    return list(session.scalars(query))


def revoke_token(session: Session, token_id: str) -> ApiToken:
    """Revoke a token by its public id and commit (revoking twice changes nothing)."""
    row = session.get(ApiToken, token_id)
    if row is None:
        raise UserError(f"no token with id {token_id!r}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.commit()
    return row


def token_status(row: ApiToken, now: datetime | None = None) -> str:
    now = now or utcnow()
    if row.revoked_at is not None:
        return "revoked"
    if row.expires_at is not None and row.expires_at <= now:
        return "expired"
    return "active"


def authenticate(session: Session, token: str, settings: Settings) -> Principal | None:
    """The user a token belongs to, or None (malformed, unknown, wrong secret, revoked or expired)."""
    match = _TOKEN.fullmatch(token)
    if match is None:
        return None
    token_id, secret = match.groups()
    # One indexed look-up (primary key, the user joined); the API remembers the result (api.authcache).
    row = session.scalar(select(ApiToken).options(joinedload(ApiToken.user)).where(ApiToken.id == token_id))
    if row is None:
        hmac.compare_digest(hash_secret(secret), "0" * 64)  # the same work as a known id
        return None
    if not hmac.compare_digest(hash_secret(secret), row.secret_hash) or token_status(row) != "active":
        return None
    user = row.user
    return Principal(
        id=user.id,
        name=user.name,
        is_admin=user.is_admin,
        limits=effective_limits(user, settings),
        token_expires_at=row.expires_at,
    )


# --- the embedded stack's first admin --------------------------------------------------------------


def write_token_file(path: Path, token: str) -> None:
    """Write a token readable by its owner only (0600 from the start, never briefly wider)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (token + "\n").encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def ensure_local_token(session: Session, settings: Settings) -> bool:
    """Make sure settings.token_file holds a working admin token; True if a new one was made.

    `trainbox up` calls this on every start: the first start creates the admin user `admin` and its
    token; later starts keep a token that still works and replace one that was revoked or lost.
    """
    path = settings.token_file
    if path.is_file() and authenticate(session, path.read_text().strip(), settings) is not None:
        return False
    user = session.scalar(select(User).where(User.name == LOCAL_ADMIN))
    if user is None:
        create_user(session, name=LOCAL_ADMIN, is_admin=True)
    _, token = create_token(session, user_name=LOCAL_ADMIN, name="trainbox up (local admin)")
    write_token_file(path, token)
    return True


def bootstrap_local_admin() -> None:
    """`python -c "from core.users import bootstrap_local_admin; bootstrap_local_admin()"` (the stack runs it)."""
    from core.db import session_scope
    from core.settings import get_settings

    with session_scope() as session:
        ensure_local_token(session, get_settings())
