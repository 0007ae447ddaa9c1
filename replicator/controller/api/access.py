"""API tokens (admin) and the audit log (read-only and up)."""
from __future__ import annotations

import datetime as dt

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response
from sqlalchemy import select

from .. import models as m
from .. import schemas as sc
from ..auth import Principal, admin, create_token, reader
from .common import DB, ERRORS, conflict, note, one

router = APIRouter(prefix="/v1", responses=ERRORS)
NamePath = sc.NAME_PATTERN


@router.get("/tokens", response_model=list[sc.TokenOut], dependencies=[Depends(admin)], tags=["access"])
def list_tokens(s: DB):
    return [sc.TokenOut.model_validate(t) for t in s.scalars(select(m.ApiToken).order_by(m.ApiToken.name))]


@router.post("/tokens", status_code=201, response_model=sc.TokenCreated, tags=["access"])
def make_token(body: sc.TokenIn, s: DB, request: Request, who: Principal = Depends(admin)):
    """A new token; its secret is in this response only."""
    note(request, f"token/{body.name}", role=body.role)
    if s.scalar(select(m.ApiToken.id).where(m.ApiToken.name == body.name)):
        raise conflict(f"token {body.name!r} already exists")
    secret = create_token(s, body.name, body.role, created_by=who.name)
    t = one(s, m.ApiToken, "token", name=body.name)
    return sc.TokenCreated(token=secret, **sc.TokenOut.model_validate(t).model_dump())


@router.delete("/tokens/{name}", status_code=204, response_class=Response, tags=["access"])
def revoke_token(s: DB, request: Request, who: Principal = Depends(admin), name: str = Path(pattern=NamePath)):
    """Revoke a token (kept, marked revoked, for the audit log's sake)."""
    note(request, f"token/{name}")
    # both tokens held (in id order) while deciding: two admins revoking each other at once left no admin
    held = s.scalars(select(m.ApiToken).where(m.ApiToken.name.in_([name, who.name])).order_by(m.ApiToken.id)
                     .with_for_update()).all()
    if any(x.name == who.name and x.revoked_at is not None for x in held):
        raise HTTPException(401, "unknown or revoked API token", headers={"WWW-Authenticate": "Bearer"})
    t = one(s, m.ApiToken, "token", name=name)
    if t.revoked_at is not None:
        raise conflict(f"token {name!r} is already revoked")
    if t.name == who.name:
        raise conflict("a token cannot revoke itself")
    t.revoked_at = m.utcnow()


@router.get("/audit", response_model=list[sc.AuditOut], dependencies=[Depends(reader)], tags=["access"])
def read_audit(s: DB, actor: str | None = Query(None, max_length=128, pattern=r"^[^\x00]*$"),
               target: str | None = Query(None, max_length=255, pattern=r"^[^\x00]*$",
                                          description="only entries on this target, exactly as the entries name it "
                                                      "(machine/web01, pair/gold-pair/extended, /v1/sites/a)"),
               since: str | None = Query(None, max_length=64, description="ISO 8601 date-time (UTC if no zone)"),
               limit: int = Query(100, ge=1, le=1000)):
    """Newest first; `actor`, `target` and `since` narrow it (all that are given)."""
    q = select(m.AuditEntry).order_by(m.AuditEntry.id.desc()).limit(limit)
    if actor is not None:
        q = q.where(m.AuditEntry.actor == actor)
    if target is not None:
        q = q.where(m.AuditEntry.target == target)
    if since is not None:
        try:
            when = dt.datetime.fromisoformat(since)
            when = when.astimezone(dt.timezone.utc) if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)
        except ValueError:
            raise HTTPException(422, f"since: must be an ISO 8601 date-time, not {since!r}") from None
        except OverflowError:           # 9999-12-31T23:00-05:00 is past the last representable instant
            raise HTTPException(422, f"since: {since!r} is out of range once in UTC") from None
        q = q.where(m.AuditEntry.at >= when)
    return [sc.AuditOut.model_validate(a) for a in s.scalars(q)]
