"""API tokens with roles: read-only (GET), operator (actions on machines, jobs, plan runs), admin (settings,
tokens, keys). Only a token's SHA-256 is stored; the first admin token is written to DATA/admin.token (0600)
at the first start, as the host's admin API does with its own token file.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import secrets
from dataclasses import dataclass

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from . import models as m
from .db import Store

log = logging.getLogger("replicator.controller")
RANK = {role: i for i, role in enumerate(m.ROLES)}
ADMIN_TOKEN_FILE = "admin.token"
TOUCH_EVERY = dt.timedelta(minutes=1)      # last_used_at is kept to the minute: a GET is not a write each time


def hash_token(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def create_token(session: Session, name: str, role: str, *, created_by: str) -> str:
    """A new token; returns the secret (shown once)."""
    if role not in RANK:
        raise ValueError(f"role must be one of {', '.join(m.ROLES)}, not {role!r}")
    secret = "rpc_" + secrets.token_urlsafe(32)
    session.add(m.ApiToken(name=name, token_hash=hash_token(secret), role=role, created_by=created_by))
    session.flush()
    return secret


def _write_private(path: str, data: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def ensure_admin_token(store: Store, data_dir: str) -> str | None:
    """The admin token from DATA/admin.token; at the first start (no token in the database) a new one is made
    and written there. Returns None when tokens exist but the file is gone or stale (no admin token is ever
    minted behind the operators' backs: they make one with an existing admin token)."""
    path = os.path.join(data_dir, ADMIN_TOKEN_FILE)
    try:
        with open(path) as f:
            secret = f.read().strip()
    except FileNotFoundError:
        secret = None
    with store.session() as s:
        if secret and s.scalar(select(m.ApiToken.id).where(m.ApiToken.token_hash == hash_token(secret),
                                                          m.ApiToken.revoked_at.is_(None))):
            return secret
        if s.scalar(select(m.ApiToken.id).limit(1)) is not None:
            log.warning("%s is %s; use an existing admin token", path, "stale" if secret else "absent")
            return None
    try:
        with store.session() as s:
            secret = create_token(s, "admin", "admin", created_by="replicator-controller")
            s.add(m.AuditEntry(actor="replicator-controller", action="token.create", target="admin",
                               detail={"role": "admin", "file": path}))
            _write_private(path, secret + "\n")
    except IntegrityError:          # another controller process on the same database made it first
        return ensure_admin_token(store, data_dir)
    return secret


@dataclass(frozen=True)
class Principal:
    name: str
    role: str

    def can(self, role: str) -> bool:
        return RANK[self.role] >= RANK[role]


bearer = HTTPBearer(auto_error=False, description="an API token (DATA/admin.token, or one made by an admin)")


def authenticate(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Principal:
    if creds is None or creds.scheme.lower() != "bearer" or not creds.credentials:
        raise HTTPException(401, "missing API token: send 'Authorization: Bearer TOKEN'",
                            headers={"WWW-Authenticate": "Bearer"})
    store: Store = request.app.state.store
    now = m.utcnow()
    with store.session() as s:
        token = s.scalar(select(m.ApiToken).where(m.ApiToken.token_hash == hash_token(creds.credentials)))
        if token is None or token.revoked_at is not None:
            raise HTTPException(401, "unknown or revoked API token", headers={"WWW-Authenticate": "Bearer"})
        if token.last_used_at is None or now - token.last_used_at > TOUCH_EVERY:
            s.execute(update(m.ApiToken).where(m.ApiToken.id == token.id).values(last_used_at=now))
        principal = Principal(token.name, token.role)
    request.state.actor = principal.name
    return principal


def require(role: str):
    """A dependency refusing principals below `role` (403), after authentication (401)."""

    def check(principal: Principal = Depends(authenticate)) -> Principal:
        if not principal.can(role):
            raise HTTPException(403, f"token {principal.name!r} is {principal.role}; this needs {role}")
        return principal
    check.__name__ = f"require_{role.replace('-', '_')}"
    return check


reader = require("read-only")
operator = require("operator")
admin = require("admin")
