"""The job queue in the database. A job is run by one worker at a time -- a controller process or a host --
even when several controller processes share one PostgreSQL database: a worker takes a job only through a
conditional UPDATE (the row must still be claimable when the UPDATE runs: PostgreSQL re-checks the WHERE
after waiting on the row's lock, SQLite serializes writers), and holds it under a lease it renews. A worker
whose lease lapsed has lost the job: its renew and finish are refused (they name the claimer), so a job
taken over is never finished twice.
"""
from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from . import models as m
from .db import Store

DEFAULT_LEASE = dt.timedelta(seconds=60)


def enqueue(session: Session, kind: str, *, machine: m.Machine | None = None, host_id: str | None = None,
            plan_run_id: int | None = None, params: dict | None = None, created_by: str = "",
            message: str = "") -> m.Job:
    job = m.Job(kind=kind, machine_id=machine.id if machine else None, host_id=host_id, plan_run_id=plan_run_id,
                params=params or {}, created_by=created_by, message=message)
    session.add(job)
    session.flush()
    log(session, job.id, f"queued by {created_by or 'the controller'}" + (f": {message}" if message else ""))
    return job


def log(session: Session, job_id: int, line: str) -> None:
    session.add(m.JobLogLine(job_id=job_id, line=line))


def _claimable(now: dt.datetime):
    return or_(m.Job.state == "queued",
               and_(m.Job.state == "running", m.Job.lease_expires_at < now))


def claim(store: Store, worker: str, *, kinds: Iterable[str] | None = None, host_id: str | None = None,
          lease: dt.timedelta = DEFAULT_LEASE) -> m.Job | None:
    """Take the oldest claimable job (queued, or running under a lapsed lease) for `worker`, or None."""
    now = m.utcnow()
    with store.session() as s:
        q = select(m.Job.id, m.Job.state, m.Job.claimed_by).where(_claimable(now), m.Job.cancel_requested.is_(False))
        if kinds is not None:
            q = q.where(m.Job.kind.in_(list(kinds)))
        q = q.where(m.Job.host_id == host_id) if host_id is not None else q.where(m.Job.host_id.is_(None))
        q = q.order_by(m.Job.id).limit(8)
        if store.dialect == "postgresql":
            q = q.with_for_update(skip_locked=True)       # rows another claimer holds are skipped, not waited on
        for job_id, state, previous in s.execute(q).all():
            taken = s.execute(
                update(m.Job).where(m.Job.id == job_id, _claimable(now), m.Job.cancel_requested.is_(False))
                .values(state="running", claimed_by=worker, lease_expires_at=now + lease,
                        attempts=m.Job.attempts + 1, started_at=m.Job.started_at if state == "running" else now)
                .execution_options(synchronize_session=False))
            if taken.rowcount == 1:
                log(s, job_id, f"claimed by {worker}" + (f" (the lease of {previous} had lapsed)"
                                                          if state == "running" else ""))
                s.flush()
                return s.get(m.Job, job_id)
    return None


def _mine(job_id: int, worker: str, now: dt.datetime):
    return (m.Job.id == job_id, m.Job.claimed_by == worker, m.Job.state == "running",
            m.Job.lease_expires_at >= now)


def renew(store: Store, job_id: int, worker: str, *, lease: dt.timedelta = DEFAULT_LEASE,
          progress: int | None = None) -> bool:
    """Extend the lease (and record progress); False when the job is no longer this worker's."""
    now = m.utcnow()
    values: dict = {"lease_expires_at": now + lease}
    if progress is not None:
        values["progress"] = max(0, min(100, progress))
    with store.session() as s:
        return s.execute(update(m.Job).where(*_mine(job_id, worker, now)).values(**values)
                         .execution_options(synchronize_session=False)).rowcount == 1


def finish(store: Store, job_id: int, worker: str, state: str, message: str = "") -> bool:
    """End a job this worker holds (succeeded, failed, cancelled); False when it lost the lease."""
    if state not in m.JOB_DONE:
        raise ValueError(f"a job finishes as one of {', '.join(m.JOB_DONE)}, not {state!r}")
    now = m.utcnow()
    values = {"state": state, "finished_at": now, "lease_expires_at": None, "message": message}
    if state == "succeeded":
        values["progress"] = 100
    with store.session() as s:
        done = s.execute(update(m.Job).where(*_mine(job_id, worker, now)).values(**values)
                         .execution_options(synchronize_session=False)).rowcount == 1
        if done:
            log(s, job_id, f"{state} ({worker})" + (f": {message}" if message else ""))
        return done


def cancel(session: Session, job: m.Job, by: str) -> str:
    """Cancel a job: at once when nobody runs it, else ask its worker (which sees cancel_requested).
    Returns what happened, for the response and the audit log. Both are conditional UPDATEs: a worker that
    claimed the job (or finished it) after `job` was read keeps it, and the cancel becomes a request."""
    now = m.utcnow()
    unclaimed = (m.Job.state.not_in(m.JOB_DONE),
                 or_(m.Job.state != "running", m.Job.lease_expires_at.is_(None), m.Job.lease_expires_at < now))
    if session.execute(update(m.Job).where(m.Job.id == job.id, *unclaimed)
                       .values(state="cancelled", finished_at=now, cancel_requested=True, lease_expires_at=None)
                       .execution_options(synchronize_session=False)).rowcount == 1:
        log(session, job.id, f"cancelled by {by}")
        what = "cancelled"
    elif session.execute(update(m.Job).where(m.Job.id == job.id, m.Job.state == "running",
                                             m.Job.lease_expires_at >= now)
                         .values(cancel_requested=True).execution_options(synchronize_session=False)).rowcount == 1:
        session.refresh(job)
        log(session, job.id, f"cancel requested by {by}; {job.claimed_by} stops it")
        what = "cancel requested"
    else:
        session.refresh(job)
        raise ValueError(f"job {job.id} is already {job.state}")
    session.refresh(job)
    return what
