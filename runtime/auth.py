"""Bearer-token auth. Tokens map to caller names; the caller name is also the storage namespace.

With no tokens configured every request is the admin caller "local" (and `hone serve` refuses to
bind anywhere but loopback).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from fastapi import Request

from .config import Settings
from .errors import ApiError

LOCAL_CALLER = "local"
ADMIN_CALLER = "admin"


@dataclass(frozen=True)
class Caller:
    name: str
    admin: bool


def authenticate(settings: Settings, request: Request) -> Caller:
    if not settings.auth_enabled:
        return Caller(LOCAL_CALLER, admin=True)
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "missing bearer token: send 'Authorization: Bearer <token>'", "unauthorized",
                       headers={"WWW-Authenticate": "Bearer"})
    token = token.strip()
    if settings.admin_token and _same(token, settings.admin_token):
        return Caller(ADMIN_CALLER, admin=True)
    for name, expected in settings.api_tokens.items():
        if _same(token, expected):
            return Caller(name, admin=False)
    raise ApiError(401, "invalid bearer token", "unauthorized", headers={"WWW-Authenticate": "Bearer"})


def _same(given: str, expected: str) -> bool:
    # bytes, because compare_digest refuses non-ASCII str (a 500 for any odd header otherwise)
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode())


def require_admin(caller: Caller) -> None:
    if not caller.admin:
        raise ApiError(403, "this endpoint needs the admin token", "forbidden")
