"""A user's own API tokens: list (never the secrets), create (the secret shown once), revoke."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Path, Request, Response, status
from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.deps import CurrentUser, SessionDep
from api.errors import NotFound, documented
from api.limits import token_limit_exceeded
from core import users as service
from core.models import ApiToken

router = APIRouter(prefix="/tokens", tags=["tokens"])


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("default", min_length=1, max_length=100, pattern=f"^{service.TOKEN_NAME.pattern}$")
    expires_in_days: float | None = Field(
        None, strict=True, ge=0.001, le=3650, description="none: until revoked; never later than the token making it"
    )

    @field_validator("name")
    @classmethod
    def _whole_name(cls, v: str) -> str:
        # The same rule as the service, matched whole: a pattern's `$` may match before a final newline.
        if not service.TOKEN_NAME.fullmatch(v):
            raise ValueError("token names are 1-100 letters, digits, spaces or . @ : ( ) - _")
        return v


class TokenRead(BaseModel):
    id: str = Field(description="public: names the token for listing and revoking")
    name: str
    user: str
    state: str = Field(description="active, expired or revoked")
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None


class TokenCreated(TokenRead):
    token: str = Field(description="the secret: shown this once, stored only as a hash")


def _read(row: ApiToken, user: str) -> dict[str, object]:
    """A token as TokenRead shows it: its columns, its user's name and its state (never the secret)."""
    columns = {name: getattr(row, name) for name in TokenRead.model_fields if name not in ("user", "state")}
    return columns | {"user": user, "state": service.token_status(row)}


@router.get("", response_model=list[TokenRead])
def list_tokens(session: SessionDep, user: CurrentUser) -> list[TokenRead]:
    """Your tokens, oldest first (never their secrets)."""
    return [TokenRead(**_read(t, user.name)) for t in service.list_tokens(session, user_name=user.name)]


@router.post("", status_code=status.HTTP_201_CREATED, response_model=TokenCreated, responses=documented(403, 413))
def create_token(body: TokenCreate, session: SessionDep, user: CurrentUser) -> TokenCreated:
    """A new token for yourself (e.g. to rotate one); its secret is in this response only.

    It expires no later than the token that made it; 403 once you hold `max_tokens` live tokens."""
    expires = timedelta(days=body.expires_in_days) if body.expires_in_days else None
    try:
        row, token = service.create_token(
            session,
            user_name=user.name,
            name=body.name,
            expires_in=expires,
            not_after=user.token_expires_at,
            max_live=user.limits.max_tokens,
        )
    except service.TokenLimitReached as e:
        raise token_limit_exceeded(user, e.live) from None
    return TokenCreated(**_read(row, user.name), token=token)


@router.delete("/{token_id}", status_code=status.HTTP_204_NO_CONTENT, responses=documented(404))
def revoke_token(
    token_id: Annotated[str, Path(min_length=1, max_length=32, pattern=r"^[0-9a-z]+$")],
    session: SessionDep,
    user: CurrentUser,
    request: Request,
) -> Response:
    """Revoke one of your tokens (admins: anyone's); requests with it get 401 from now on (through other
    API processes, within TRAINBOX_AUTH_CACHE_S)."""
    row = session.get(ApiToken, token_id)
    if row is None or not (user.is_admin or row.user_id == user.id):
        raise NotFound(f"no token with id {token_id!r}", ["path", "token_id"])
    service.revoke_token(session, token_id)
    request.app.state.auth_cache.clear()
    return Response(status_code=status.HTTP_204_NO_CONTENT)
