"""The web console: static files under /ui/ and the live-update stream /v1/events.

The console is a static front end that reads and changes everything through the REST API with the user's
bearer token (kept in sessionStorage, never a cookie: a forged cross-site request carries no credential, so
the console needs no CSRF tokens). Besides those files it serves three reads, authenticated like the rest
of the API: the live-update stream, `whoami` (the token's role, so pages show only what it may do) and the
hosts' reports per machine (observed.py). Every page is served with a Content-Security-Policy that lets the
browser load nothing from anywhere but the controller itself.
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import FileResponse, RedirectResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import BaseModel
from sqlalchemy import select

from .. import auth
from .. import models as m
from ..schemas import Error
from . import live, observed

log = logging.getLogger("replicator.controller")
STATIC = Path(__file__).with_name("static")
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-cache"}
POLL_SECONDS = 1.0
KEEPALIVE_SECONDS = 15.0

# The console's files and the endless event stream stay out of the OpenAPI document (a fuzzer would wait on
# the stream forever); whoami and the observed entries are API like any other.
router = APIRouter()
router.include_router(observed.router)


class Me(BaseModel):
    name: str
    role: str


@router.get("/v1/whoami", response_model=Me, tags=["access"],
            responses={401: {"model": Error, "description": "no or bad API token"}})
def whoami(who: auth.Principal = Depends(auth.reader)) -> Me:
    """The token's name and role: the console shows only the actions the role may take."""
    return Me(name=who.name, role=who.role)


@router.get("/ui", include_in_schema=False)
def ui_root() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=307)


@router.get("/ui/", include_in_schema=False)
def ui_index() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers=HEADERS, media_type="text/html")


@router.get("/ui/static/{path:path}", include_in_schema=False)
def ui_static(path: str) -> FileResponse:
    """A file of the console; anything outside static/ (.., absolute, symlinks out) is a 404."""
    target = (STATIC / path).resolve()
    if not target.is_relative_to(STATIC.resolve()) or not target.is_file():
        raise HTTPException(404, f"no such console file: {path}")
    return FileResponse(target, headers=HEADERS)


def _frame(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def _stream(request: Request, token_hash: str) -> AsyncIterator[bytes]:
    store = request.app.state.store
    watcher = live.Watcher()

    def look() -> list[tuple[str, dict]] | None:
        """What changed; None once the stream's token is revoked (it was valid when the stream opened)."""
        with store.session() as s:
            if s.scalar(select(m.ApiToken.id).where(m.ApiToken.token_hash == token_hash,
                                                    m.ApiToken.revoked_at.is_(None))) is None:
                return None
            return watcher.poll(s)

    quiet = 0.0
    yield b"retry: 2000\n\n"
    while not await request.is_disconnected():
        try:
            events = await asyncio.to_thread(look)
        except Exception as exc:
            # a database hiccup: say so, and start afresh (what this look saw is lost): the next look that
            # works sends `ready`, on which pages read the API again
            log.warning("event stream: %s", " ".join(str(exc).split())[:300])
            events, watcher = [("problem", {"error": f"database: {type(exc).__name__}"})], live.Watcher()
        if events is None:
            yield _frame("revoked", {"error": "this API token was revoked"})
            return
        for event, data in events:
            yield _frame(event, data)
        quiet = 0.0 if events else quiet + POLL_SECONDS
        if quiet >= KEEPALIVE_SECONDS:
            quiet = 0.0
            yield b": keep-alive\n\n"
        await asyncio.sleep(POLL_SECONDS)


@router.get("/v1/events", dependencies=[Depends(auth.reader)], include_in_schema=False)
def events(request: Request, creds: HTTPAuthorizationCredentials = Depends(auth.bearer)) -> StreamingResponse:
    """Server-sent events: `ready` once, then `job`, `machine`, `machine_removed` and `plan_run` as rows change;
    `revoked` and the end when the token is revoked meanwhile."""
    return StreamingResponse(_stream(request, auth.hash_token(creds.credentials)), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
