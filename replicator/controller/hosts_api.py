"""The host channel (docs/management-plane.md): registration with a key, certificate renewal, each host's
desired configuration and its reports; and the admin route that makes registration keys.

Hosts authenticate by the client certificate this controller's CA issued them (subject CN = host id), which
the TLS layer verifies (tls.py) and hands over in the ASGI scope. Only GET /v1/ca and POST /v1/register are
answered without one: the first is public (a host checks it against the key's hash before trusting it), the
second is authenticated by the registration key's token.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import math
import os
import re
import secrets
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from cryptography import x509
from fastapi import APIRouter, Depends, HTTPException, Path, Request
from fastapi.responses import PlainTextResponse, Response
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from . import desired, failover, history
from . import models as m
from .api.common import DB, ERRORS, find_host, note, one
from .auth import Principal, admin, hash_token, reader
from .ca import CertificateAuthority, CSRRefused
from .tls import peer_common_name

router = APIRouter(tags=["host channel"])
KEY_TTL = dt.timedelta(hours=24)
MAX_KEY_TTL = dt.timedelta(days=30)
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$")


def _url(v: str) -> str:
    parts = urlsplit(v)
    try:
        parts.port
    except ValueError:
        raise ValueError(f"has a bad port: {v!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") or parts.query:
        raise ValueError(f"must be http(s)://HOST:PORT, not {v!r}")
    return v


Url = Annotated[str, Field(max_length=512), AfterValidator(_url)]
Hostname = Annotated[str, Field(pattern=_HOSTNAME.pattern, max_length=253)]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RegisterIn(_In):
    token: str = Field(min_length=1, max_length=256)
    hostname: Hostname
    csr: str = Field(min_length=1, max_length=16384, description="PEM certificate signing request")
    admin_url: Url = Field(description="the host's admin API (loopback on the host: http://127.0.0.1:8085)")
    data_url: Url = Field(description="where other hosts reach its replica listener (https://HOST:8084)")
    site: str | None = Field(None, max_length=64, description="the site the key file names (checked)")


class RegisterOut(BaseModel):
    host_id: str
    certificate: str
    ca: str
    renew_after: dt.datetime


class RenewIn(_In):
    csr: str = Field(min_length=1, max_length=16384)


class RenewOut(BaseModel):
    certificate: str
    renew_after: dt.datetime


class DesiredOut(BaseModel):
    revision: int
    config: dict[str, Any] = Field(description="replicatord's configuration (replicatord.toml's schema) as JSON")
    fencing: dict[str, dict[str, Any]]
    operations: dict[str, dict[str, Any]] = Field(description="per machine: state (enabled, paused) and resync "
                                                  "(a counter: raised, it asks for one resync)")


MAX_DEPTH = 32         # a status document nests ~6 deep; the stored report is served back (pydantic stops near 500)


def _servable(doc):
    """A report's free-form documents are stored and served back as they are: one nested deeper than
    MAX_DEPTH, with a string that is not Unicode (a lone surrogate escape), or with NaN or infinity (SQLite
    stored them as null, PostgreSQL refused the row), is refused here, before it is stored and breaks GET
    /v1/hosts/HOST/report for everyone."""
    level = [doc]
    for depth in range(MAX_DEPTH + 1):
        for text in (t for x in level for t in ([x] if isinstance(x, str) else x if isinstance(x, dict) else ())):
            if isinstance(text, str) and not text.isascii():
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError("holds a string that is not valid Unicode (a lone surrogate)") from None
        if any(isinstance(x, float) and not math.isfinite(x) for x in level):
            raise ValueError("holds a number that is not finite (NaN or infinity: JSON has none)")
        level = [v for x in level for v in (x.values() if isinstance(x, dict) else x if isinstance(x, list) else ())]
        if not level:
            return doc
    raise ValueError(f"nests deeper than {MAX_DEPTH} levels")


class PointIn(BaseModel):
    """One recovery point of a machine on the replica host (daemon/replica_site.py ReplicatedMachine.points)."""
    point: int = Field(ge=0, le=2 ** 53)
    time: float = Field(gt=0, lt=1e11, description="when its data is from (seconds since the epoch)")
    consistency: Literal["crash", "application"]
    generations: dict[Annotated[str, Field(max_length=64)], Annotated[int, Field(ge=0, le=2 ** 53)]] = Field(
        default_factory=dict, max_length=256, description="each disk's generation at this point")


MAX_REPORTED_MACHINES = 2000


def _few_machines(v: dict | None) -> dict | None:
    if v is not None and len(v) > MAX_REPORTED_MACHINES:
        raise ValueError(f"names {len(v)} machines; at most {MAX_REPORTED_MACHINES}")
    return v


class ReportIn(BaseModel):
    revision: int = Field(ge=0, le=2 ** 31 - 1, description="the desired revision the host runs")
    status: Annotated[dict[str, Any], AfterValidator(_servable)] = Field(
        description="the host's admin API /v1/status document")
    jobs: Annotated[list[dict[str, Any]], AfterValidator(_servable)] = Field(default_factory=list, max_length=200)
    problems: list[Annotated[str, Field(max_length=4000)]] = Field(default_factory=list, max_length=50)
    operations: Annotated[dict[str, dict[str, Any]], AfterValidator(_servable)] = Field(
        default_factory=dict, description="per machine, what the host applied of the desired operations: state, "
        "resync (the counter), resync_job (its job id) or resync_error")
    points: Annotated[dict[Annotated[str, Field(max_length=255)],
                           Annotated[list[PointIn], Field(max_length=history.MAX_POINTS)]] | None,
                      AfterValidator(_few_machines)] = Field(
        None, description="a replica host: per machine it holds, its newest recovery points, oldest first")
    extended: Annotated[list[dict[str, Any]], AfterValidator(_servable)] = Field(
        default_factory=list, max_length=200, description="a replica host: its extended legs' status documents "
        "(GET /v1/extended on the host)")


class ReportOut(BaseModel):
    revision: int = Field(description="the newest desired revision: behind if above the one reported")


class LastReport(ReportIn):
    received_at: dt.datetime


class KeyIn(_In):
    expires_in: int = Field(int(KEY_TTL.total_seconds()), ge=60, le=int(MAX_KEY_TTL.total_seconds()),
                            description="seconds the key stays usable (default a day)")


class KeyOut(BaseModel):
    controller: str
    site: str
    token: str
    ca_sha256: str
    expires: dt.datetime


def install(app) -> None:
    """Add the host channel to the controller's app: its routes, and the CA from DATA/ca (made at the first
    start). Set `app.state.ca.lifetime` to change the lifetime of the certificates it issues."""
    if getattr(app.state, "data_dir", None):
        app.state.ca = CertificateAuthority.open(app.state.data_dir)
    app.include_router(router)


def authority(request: Request) -> CertificateAuthority:
    ca = getattr(request.app.state, "ca", None)
    if ca is None:
        raise HTTPException(503, "this controller runs without a data folder, so without a CA: no host channel")
    return ca


CA = Annotated[CertificateAuthority, Depends(authority)]


def this_host(request: Request, s: DB) -> m.Host:
    """The host whose certificate this request came with: 401 without one, 403 when no longer registered."""
    host_id = peer_common_name(request.scope)
    if host_id is None:
        raise HTTPException(401, "this route needs the host's client certificate (issued at registration)")
    host = s.get(m.Host, host_id)
    if host is None:
        raise HTTPException(403, f"host {host_id[:64]} is not registered here (removed): register it again "
                                 "with a new key")
    request.state.actor = f"host:{host.hostname}"
    return host                 # (last_seen is written by each route last: machines, then hosts, as the REST
                                # routes lock them -- the other order deadlocks against them on PostgreSQL)


Self = Annotated[m.Host, Depends(this_host)]


def _names(body: RegisterIn) -> list[str]:
    """SANs of a host certificate: its hostname and the host its data URL names (what peers connect to)."""
    return [body.hostname, urlsplit(body.data_url).hostname or body.hostname]


def _controller_names(ca: CertificateAuthority) -> set[str]:
    """The DNS names of the controller's own listener certificate (DATA/ca/controller.pem), if it has one."""
    try:
        with open(os.path.join(ca.dir, "controller.pem"), "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return set()
    return {n.lower() for n in sans.get_values_for_type(x509.DNSName)}


def _names_free(s: Session, ca: CertificateAuthority, host_id: str, names: list[str]) -> None:
    """A host certificate (server usage, signed by the deployment CA) must not name the controller or another
    host: agents verify the controller, and primaries a replica host, by name against this CA. Addresses are
    not checked (hosts on one machine share 127.0.0.1)."""
    wanted = set()
    for n in names:
        try:
            ipaddress.ip_address(n.strip("[]"))
        except ValueError:
            wanted.add(n.lower())
    if hit := wanted & _controller_names(ca):
        raise HTTPException(409, f"registration refused: {sorted(hit)[0]} is the controller's name (a host "
                                 "certificate for it would stand in for the controller)")
    for other in s.scalars(select(m.Host).where(m.Host.id != host_id)):
        if hit := wanted & {other.hostname.lower(), (urlsplit(other.data_url or "").hostname or "").lower()}:
            raise HTTPException(409, f"registration refused: {sorted(hit)[0]} already names host {other.hostname}")


def _sign(ca: CertificateAuthority, csr: str, host_id: str, names: list[str]):
    try:
        return ca.sign(csr, host_id, names)
    except CSRRefused as e:
        raise HTTPException(422, f"csr: {e}") from None


# ---------------------------------------------------------------------------------------------- routes
@router.get("/v1/ca", response_class=PlainTextResponse, responses={200: {"content": {"application/x-pem-file": {}}}})
def get_ca(ca: CA) -> PlainTextResponse:
    """The deployment CA's certificate (public); a registering host checks it against its key's ca_sha256."""
    return PlainTextResponse(ca.pem.decode(), media_type="application/x-pem-file")


def issue_key(s: Session, site: m.Site, ca: CertificateAuthority, controller_url: str, ttl: dt.timedelta,
              created_by: str) -> dict:
    """A registration key document for `site`; only the token's hash is stored."""
    token = "rrk_" + secrets.token_urlsafe(32)
    expires = m.utcnow().replace(microsecond=0) + ttl
    s.add(m.RegistrationKey(token_hash=hash_token(token), site_id=site.id, expires_at=expires,
                            created_by=created_by))
    s.flush()
    return {"controller": controller_url.rstrip("/"), "site": site.name, "token": token, "ca_sha256": ca.sha256,
            "expires": expires.isoformat()}


@router.post("/v1/sites/{site}/registration-keys", response_model=KeyOut, responses=ERRORS)
def create_key(site: str, request: Request, s: DB, ca: CA, who: Annotated[Principal, Depends(admin)],
               body: KeyIn | None = None) -> dict:
    """A registration key for one site: single use, expiring. Save the answer as the host's key file."""
    row = one(s, m.Site, "site", name=site)
    note(request, site)
    url = getattr(request.app.state, "public_url", None) or str(request.base_url)
    return issue_key(s, row, ca, url, dt.timedelta(seconds=(body or KeyIn()).expires_in), who.name)


@router.post("/v1/register", response_model=RegisterOut, responses=ERRORS)
def register(body: RegisterIn, request: Request, s: DB, ca: CA) -> dict:
    """A host joins with a registration key: its certificate is issued (CN = its new host id)."""
    request.state.actor = f"host:{body.hostname}"
    note(request, body.hostname)
    key = s.scalar(select(m.RegistrationKey).where(m.RegistrationKey.token_hash == hash_token(body.token)))
    if key is None:
        raise HTTPException(403, "registration key refused: unknown token (ask an admin for a new key)")
    if key.expires_at <= m.utcnow():
        raise HTTPException(403, f"registration key refused: it expired at {key.expires_at.isoformat()}")
    if body.site is not None and body.site != key.site.name:
        raise HTTPException(403, f"registration key refused: it is for site {key.site.name!r}, not {body.site!r}")
    host = s.scalar(select(m.Host).where(m.Host.hostname == body.hostname))
    # used_at, not used_by: removing a host sets used_by to NULL, and its key must not work again
    if key.used_at is not None and (host is None or key.used_by != host.id):
        raise HTTPException(403, "registration key refused: already used by another host (a key registers one "
                                 "host)")
    if host is not None and host.site_id != key.site_id:
        raise HTTPException(403, f"registration key refused: host {body.hostname} is registered in site "
                                 f"{host.site.name!r}; this key is for site {key.site.name!r}")
    if host is None:
        host = m.Host(id=m.new_host_id(), hostname=body.hostname, site_id=key.site_id)
        s.add(host)
    host.admin_url, host.data_url = body.admin_url, body.data_url
    s.flush()
    # taken by a conditional UPDATE: two hosts racing with one key (two controllers on one database) get one winner
    taken = s.execute(update(m.RegistrationKey)
                      .where(m.RegistrationKey.id == key.id,
                             (m.RegistrationKey.used_at.is_(None)) | (m.RegistrationKey.used_by == host.id))
                      .values(used_by=host.id, used_at=m.utcnow())
                      .execution_options(synchronize_session=False)).rowcount
    if not taken:
        raise HTTPException(403, "registration key refused: already used by another host")
    _names_free(s, ca, host.id, _names(body))
    issued = _sign(ca, body.csr, host.id, _names(body))
    host.cert_serial, host.cert_not_after, host.last_seen = issued.serial, issued.not_after, m.utcnow()
    request.state.audit_detail = {"host_id": host.id, "site": key.site.name, "serial": issued.serial}
    return {"host_id": host.id, "certificate": issued.pem, "ca": ca.pem.decode(), "renew_after": issued.renew_after}


@router.post("/v1/hosts/self/renew", response_model=RenewOut, responses=ERRORS)
def renew(body: RenewIn, request: Request, host: Self, ca: CA) -> dict:
    """A new certificate for this host (its CSR, signed by its key), before the current one expires."""
    note(request, host.id)
    data_host = urlsplit(host.data_url or "").hostname
    issued = _sign(ca, body.csr, host.id, [host.hostname, data_host or host.hostname])
    host.cert_serial, host.cert_not_after, host.last_seen = issued.serial, issued.not_after, m.utcnow()
    request.state.audit_detail = {"serial": issued.serial, "not_after": issued.not_after.isoformat()}
    return {"certificate": issued.pem, "renew_after": issued.renew_after}


@router.get("/v1/hosts/self/desired", response_model=DesiredOut, responses=ERRORS)
def get_desired(s: DB, host: Self) -> dict:
    """What this host should run: replicatord's configuration, the fencing table, and their revision."""
    doc = desired.current(s, host)
    host.last_seen = m.utcnow()
    return doc


def _placed_on(s: Session, host: m.Host) -> tuple[list[m.Machine], set[int]]:
    """The machines this host is the primary or the replica host of, and which of them are reversed
    (history.reversed_ids): read once per report, for both _observe and _points."""
    machines = list(s.scalars(select(m.Machine).where(
        (m.Machine.primary_host_id == host.id) | (m.Machine.replica_host_id == host.id))))
    return machines, history.reversed_ids(s, machines)


def _observe(s: Session, host: m.Host, status: dict, placed: tuple[list[m.Machine], set[int]]) -> None:
    """The machines this host protects take its report's state, health, RPO and last success; each gets an
    RPO sample at most every history.SAMPLE_EVERY. This host protects a machine it is the primary host of,
    or the replica host of while the machine's direction is reversed (the primary host, which then holds the
    way back's replica, no longer protects it: what it says of the machine is not the machine's state)."""
    entries = {e.get("name"): e for e in status.get("machines") or [] if isinstance(e, dict)}
    if not entries:
        return
    now = m.utcnow()
    sampled = []
    machines, reversed_ = placed
    for machine in machines:
        if machine.name not in entries or history.protecting_host_id(machine, reversed_) != host.id:
            continue
        e = entries[machine.name]
        stats = e.get("stats") if isinstance(e.get("stats"), dict) else {}
        machine.observed_state = str(e.get("state"))[:64] if e.get("state") is not None else None
        machine.health = str(stats.get("health"))[:32] if stats.get("health") is not None else None
        rpo = stats.get("achieved_rpo")
        machine.rpo_seconds = float(rpo) if isinstance(rpo, (int, float)) and not isinstance(rpo, bool) else None
        if (last := history.success_time(stats)) is not None:
            machine.last_success_at = last
        machine.observed_at = now
        sampled.append((machine, e))
    history.record(s, sampled, now)


def _points(s: Session, host: m.Host, reported: dict[str, list[PointIn]] | None,
            placed: tuple[list[m.Machine], set[int]]) -> None:
    """A replica host's recovery points, for the machines whose replica it holds (placed on it as their
    replica; while a machine is reversed, its primary host holds the way back's). A name the host
    qualifies with its storage (NAME@ROOT, when it holds machines in several) counts as NAME if only one does."""
    if reported is None:
        return                                              # an agent from before points were reported
    by_name = {k: [p.model_dump() for p in v] for k, v in reported.items()}
    bases: dict[str, list[str]] = {}
    for key in by_name:
        if "@" in key:
            bases.setdefault(key.split("@", 1)[0], []).append(key)
    for base, keys in bases.items():
        if base not in by_name and len(keys) == 1:
            by_name[base] = by_name[keys[0]]
    machines, reversed_ = placed
    machines = [x for x in machines if history.replica_side_host_id(x, reversed_) == host.id]
    history.store_points(s, host, machines, by_name, m.utcnow())


STATE_JOBS = ("enable-protection", "pause-protection", "resume-protection", "resync", "disable-protection")


def _set(s: Session, job: m.Job, state: str, message: str, now, progress: int | None = None) -> None:
    if job.state != state or job.message != message:
        s.add(m.JobLogLine(job_id=job.id, line=message))
    job.state, job.message, job.started_at = state, message, job.started_at or now
    if progress is not None:
        job.progress = max(0, min(100, progress))
    if state in m.JOB_DONE:
        job.finished_at = now


def _follow_resync(s: Session, job: m.Job, host: m.Host, body: ReportIn, now) -> None:
    """A resync job follows the host's own resync job (progress, outcome), once the host started it."""
    op = body.operations.get(job.machine.name if job.machine else "", {})
    if op.get("resync_error"):
        _set(s, job, "failed", f"host {host.hostname} could not start the resync: {op['resync_error']}"[:2000], now)
        return
    mine = next((j for j in body.jobs if op.get("resync_job") and j.get("id") == op["resync_job"]), None)
    if mine is None:
        return                                  # not started yet (the daemon is restarting on the revision)
    percent = mine.get("percent")
    percent = int(percent) if isinstance(percent, (int, float)) and not isinstance(percent, bool) else None
    state = {"running": "running", "succeeded": "succeeded", "cancelled": "cancelled"}.get(mine.get("state"), "failed")
    why = f": {mine.get('error')}" if state == "failed" and mine.get("error") else ""
    _set(s, job, state, f"host {host.hostname}: resync {mine.get('state')} ({mine.get('id')}){why}"[:2000], now,
         100 if state == "succeeded" else percent)


def _applied(s: Session, host: m.Host, body: ReportIn) -> None:
    """Jobs waiting for this host to apply a desired revision (api/machines.py) succeed once it runs it; a
    resync job follows the resync the host runs."""
    now = m.utcnow()
    for job in s.scalars(select(m.Job).where(m.Job.host_id == host.id, m.Job.state.in_(("queued", "running")),
                                             m.Job.claimed_by.is_(None), m.Job.kind.in_(STATE_JOBS))):
        wanted = (job.params or {}).get("revision")
        if not isinstance(wanted, int) or wanted > body.revision:
            continue
        if job.kind == "resync":
            _follow_resync(s, job, host, body, now)
        else:
            _set(s, job, "succeeded", f"host {host.hostname} runs desired revision {body.revision}", now, 100)


@router.post("/v1/hosts/self/report", response_model=ReportOut, responses=ERRORS)
def report(body: ReportIn, s: DB, host: Self) -> dict:
    """The host's status, jobs and problems; the answer says the newest revision (a host sees it is behind)."""
    placed = _placed_on(s, host)
    _observe(s, host, body.status, placed)
    _points(s, host, body.points, placed)
    _applied(s, host, body)
    failover.follow(s, host, body.operations)            # failover steps this host runs, owner leases
    doc = body.model_dump()
    doc["received_at"] = m.utcnow().isoformat()
    host.last_report, host.applied_revision, host.last_seen = doc, body.revision, m.utcnow()
    return {"revision": desired.current(s, host)["revision"]}



@router.get("/v1/hosts/{host}/report", response_model=LastReport, dependencies=[Depends(reader)], responses=ERRORS,
            tags=["hosts"])
def last_report(s: DB, host: str = Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")) -> dict:
    """What a host (id or hostname) last reported: the revision it runs, its status document, jobs, problems
    (and, in status.controller, since when it could not reach the controller, if it could not)."""
    h = find_host(s, host)
    if h is None:
        raise HTTPException(404, f"no host {host!r}")
    if not h.last_report:
        raise HTTPException(404, f"host {h.hostname} has not reported yet")
    return h.last_report


@router.delete("/v1/hosts/{host}", status_code=204, response_class=Response, responses=ERRORS, tags=["hosts"])
def remove_host(request: Request, s: DB, who: Annotated[Principal, Depends(admin)],
                host: str = Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")) -> Response:
    """Forget a host (id or hostname): its certificate is refused from now on (it runs on from what it has and
    says so); it joins again only with a new key. Refused while machines are placed on it."""
    h = find_host(s, host)
    if h is None:
        raise HTTPException(404, f"no host {host!r}")
    note(request, f"host/{h.hostname}", host_id=h.id)
    placed = s.scalar(select(func.count()).select_from(m.Machine).where(
        (m.Machine.primary_host_id == h.id) | (m.Machine.replica_host_id == h.id)))
    placed += s.scalar(select(func.count()).select_from(m.ExtendedPlacement)      # its extended replicas too
                       .where(m.ExtendedPlacement.host_id == h.id))
    if placed:
        raise HTTPException(409, f"host {h.hostname!r} has {placed} machine(s) placed on it: move or disable and "
                                 "remove them first")
    s.delete(h)
    return Response(status_code=204)
