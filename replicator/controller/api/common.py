"""What every router shares: a session per request, lookups by name that 404 with one line, the error
responses each route documents (so the OpenAPI document is true for refusals too), and the desired-revision
bump that tells hosts their configuration changed."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from .. import models as m
from ..schemas import Error

ERRORS = {code: {"model": Error, "description": why} for code, why in (
    (400, "the request cannot be used"), (401, "no or bad API token"), (403, "the token's role is too low"),
    (404, "no such resource"), (409, "conflicts with the current state"), (422, "invalid input"))}


def session(request: Request) -> Iterator[Session]:
    """One transaction per request: committed when the route returns, rolled back when it raises."""
    with request.app.state.store.session() as s:
        yield s


def _select(model, lock: bool, **by):
    """FOR UPDATE when `lock`: a route that decides on what it reads (state, membership) holds the row until
    it commits, so a concurrent request on PostgreSQL decides on the outcome (SQLite runs one at a time)."""
    q = select(model).filter_by(**by)
    return q.with_for_update() if lock else q


def one(s: Session, model, what: str, lock: bool = False, **by):
    obj = s.scalar(_select(model, lock, **by))
    if obj is None:
        raise HTTPException(404, f"no {what} {next(iter(by.values()))!r}")
    return obj


def by_id(s: Session, model, ident: int, what: str, lock: bool = False):
    obj = s.get(model, ident, with_for_update=lock or None)
    if obj is None:
        raise HTTPException(404, f"no {what} {ident}")
    return obj


def ref(s: Session, model, what: str, field: str, lock: bool = False, **by):
    """A resource named in a request body: a missing one is invalid input (422), not a missing URL (404)."""
    obj = s.scalar(_select(model, lock, **by))
    if obj is None:
        raise HTTPException(422, f"{field}: no {what} {next(iter(by.values()))!r}")
    return obj


def find_host(s: Session, ref_: str) -> m.Host | None:
    """A host by id, else by hostname: a hostname may look like another host's id (a registering host picks
    its hostname), and the id names that other host."""
    return s.get(m.Host, ref_) or s.scalar(select(m.Host).where(m.Host.hostname == ref_))


def host_by_ref(s: Session, ref_: str, field: str) -> m.Host:
    h = find_host(s, ref_)
    if h is None:
        raise HTTPException(422, f"{field}: no host {ref_!r} (give its id or hostname)")
    return h


def conflict(what: str) -> HTTPException:
    return HTTPException(409, what)


def bump_revision(s: Session, host_ids: Iterable[str | None]) -> None:
    """A desired-state change for these hosts: their next GET /v1/hosts/self/desired carries it."""
    ids = sorted({h for h in host_ids if h})
    if ids:
        s.execute(update(m.Host).where(m.Host.id.in_(ids))
                  .values(desired_revision=m.Host.desired_revision + 1)
                  .execution_options(synchronize_session="fetch"))     # loaded hosts see their new revision


def pair_hosts(pair: m.CloudPair) -> list[str]:
    return [h.id for c in pair.clouds for h in c.hosts]


def note(request: Request, target: str, /, **detail) -> None:
    """What the audit entry of this request names (the middleware writes it with the outcome)."""
    request.state.audit_target = target
    request.state.audit_detail = detail


DB = Annotated[Session, Depends(session, scope="function")]
