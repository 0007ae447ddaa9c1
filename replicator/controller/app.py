"""The controller's ASGI app: `create_app(store, data_dir=...)` with every REST router, errors as one-line
JSON (`{"error": "..."}`, 4xx; validation errors too), an audit entry for every request that changes something
(or tried to), and the Prometheus endpoint. Other pieces add their routers with `app.include_router(...)`.
"""
from __future__ import annotations

import logging

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, IntegrityError, OperationalError, StatementError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from . import metrics
from . import models as m
from .api import ROUTERS
from .db import Store
from .portal.routes import router as portal_router

log = logging.getLogger("replicator.controller")
READS = frozenset({"GET", "HEAD", "OPTIONS"})
ROUTINE = frozenset({"POST /v1/hosts/self/report", "POST /v1/hosts/self/renew"})   # not audited when they succeed


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _error(request: Request, status: int, message: str, headers: dict | None = None) -> JSONResponse:
    message = _one_line(message)
    request.state.error = message
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def validation_message(exc: RequestValidationError) -> str:
    """The first problem as 'where: why' (FastAPI's list of dicts is for programs, not people)."""
    errors = exc.errors()
    if not errors:
        return "invalid request"
    first = errors[0]
    loc = list(first.get("loc", ()))
    where = ".".join(str(p) for p in (loc[1:] if loc[:1] == ["body"] else loc))
    why = first.get("msg", "invalid").removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {why}{more}" if where else f"{why}{more}"


def _allowed(request: Request) -> list[str]:
    """Every method some route serves at this path (Starlette's 405 names only the first route's)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code in (404, 405) and exc.detail in ("Not Found", "Method Not Allowed"):   # routing's
            if exc.status_code == 404:
                return _error(request, 404, f"no such route {request.method} {request.url.path}")
            return _error(request, 405, f"method not allowed on {request.method} {request.url.path}",
                          {"Allow": ", ".join(_allowed(request))})
        return _error(request, exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return _error(request, 422, validation_message(exc))

    @app.exception_handler(IntegrityError)
    async def integrity(request: Request, exc: IntegrityError):
        # a concurrent request took the name first, or a reference vanished between check and write
        return _error(request, 409, "conflicts with a concurrent change; read the resource again and retry")

    @app.exception_handler(DataError)
    async def data(request: Request, exc: DataError):
        return _error(request, 422, f"the database refused a value: {_one_line(str(exc.orig), 200)}")

    @app.exception_handler(OverflowError)
    @app.exception_handler(StatementError)
    async def out_of_range(request: Request, exc: Exception):
        # a number past what the database holds (SQLite's driver raises before sending it; a bound value's
        # conversion fails inside SQLAlchemy): the client's value, not the controller, is at fault
        cause = getattr(exc, "orig", exc)
        if isinstance(cause, OverflowError):
            return _error(request, 422, f"a value is out of range for the store: {_one_line(str(cause), 120)}")
        return await unexpected(request, exc)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error(request, 500, f"internal error ({type(exc).__name__}); the controller's log has the details")

    @app.exception_handler(OperationalError)
    async def unavailable(request: Request, exc: OperationalError):
        log.error("database unavailable: %s", _one_line(str(exc.orig), 300))
        return _error(request, 503, "the controller's database is unavailable; retry shortly")


def known_query(request: Request) -> None:
    """Refuse query parameters the route does not take: a mistyped filter (?stat=queued) must not silently
    return everything."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None or not request.query_params:
        return
    known = _QUERY_NAMES.get(id(route))
    if known is None:
        known = _QUERY_NAMES[id(route)] = frozenset(_query_names(dependant))
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        raise HTTPException(422, f"unknown query parameter {unknown[0][:64]!r}"
                                 + (f"; this route takes {', '.join(sorted(known))}" if known else ""))


_QUERY_NAMES: dict = {}


def _query_names(dependant):
    yield from (p.alias for p in dependant.query_params)
    for sub in dependant.dependencies:
        yield from _query_names(sub)


def install_audit(app: FastAPI) -> None:
    """Every request that is not a read leaves an audit entry: who, what (method and route), on what, outcome.
    Written after the request's own transaction, so a refused change is recorded as refused."""

    def write(entry: m.AuditEntry) -> None:
        with app.state.store.session() as s:
            s.add(entry)

    @app.middleware("http")
    async def audit(request: Request, call_next):
        response = await call_next(request)
        if request.method in READS:
            return response
        route = request.scope.get("route")
        action = f"{request.method} {getattr(route, 'path', request.url.path)}"[:64]
        status = response.status_code
        if status < 400 and action in ROUTINE:   # every host, every poll: its last report is kept on the host row
            return response
        if status == 401:                        # nobody we know: a log line, not a row anyone can add at will
            log.warning("refused without valid credentials: %s %s from %s", request.method,
                        request.url.path[:200], request.client.host if request.client else "?")
            return response
        outcome = f"{status} " + ("ok" if status < 400 else getattr(request.state, "error", "refused"))
        state = request.state
        entry = m.AuditEntry(actor=getattr(state, "actor", None) or "anonymous", action=action,
                             target=(getattr(state, "audit_target", None) or request.url.path)[:255],
                             outcome=outcome[:255], detail=getattr(state, "audit_detail", None) or {})
        try:
            await run_in_threadpool(write, entry)
        except Exception as e:                    # the change stands; say loudly that its record is missing
            log.error("audit entry not written (%s %s by %s): %s", action, entry.target, entry.actor, e)
        return response


MAX_BODY = 4 * 1024 * 1024     # bytes: a host's report of a thousand machines is ~2 MiB; everything else is small


class BodyLimit:
    """Refuse request bodies over `limit` bytes with a one-line 413 before the app reads them: the host
    channel's /v1/register answers anyone, and an unbounded body is memory the controller cannot refuse later.
    The body is read here (it is small) and handed on whole."""

    def __init__(self, app, limit: int = MAX_BODY):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self._refuse(scope, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":          # the client left before sending its body
                return await self.app(scope, _replay([message], receive), send)
            size += len(message.get("body", b""))
            if size > self.limit:
                return await self._refuse(scope, send)
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        whole = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([whole], receive), send)

    async def _refuse(self, scope, send):
        body = JSONResponse({"error": f"request body over {self.limit // (1024 * 1024)} MiB"}, status_code=413)
        await body(scope, _nothing, send)


def _replay(messages: list, receive):
    async def again():
        return messages.pop(0) if messages else await receive()
    return again


async def _nothing():
    return {"type": "http.disconnect"}


def create_app(store: Store, *, data_dir: str | None = None, title: str = "replicator controller") -> FastAPI:
    """The REST API on `store`. Extend it with `app.include_router(router)`; `app.state.store` is the store."""
    app = FastAPI(title=title, version="1", dependencies=[Depends(known_query)],
                  description="The management plane of replicator: sites, hosts, "
                  "clouds, pairs, policies, mappings, machines, jobs, recovery plans, tokens and the audit log. "
                  "Errors are {\"error\": \"...\"}.")
    app.state.store = store
    app.state.data_dir = data_dir
    install_error_handlers(app)
    app.add_middleware(BodyLimit)           # inside the audit: a refused body is an audited refusal
    install_audit(app)
    for router in ROUTERS:
        app.include_router(router)
    app.include_router(metrics.router)
    app.include_router(portal_router)
    from .api.history import router as history_router; app.include_router(history_router)   # noqa: E702 (issue 15)
    from .hosts_api import install as install_host_channel; install_host_channel(app)   # noqa: E702 (H2's line)
    return app
