"""Jobs (the Jobs tab): list, follow (with the log), cancel."""
from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from sqlalchemy import select

from .. import failover, jobs
from .. import models as m
from .. import schemas as sc
from ..auth import Principal, operator, reader
from .common import DB, ERRORS, by_id, conflict, note

router = APIRouter(prefix="/v1", responses=ERRORS, tags=["jobs"])
JobId = Path(ge=1, le=2 ** 31 - 1)


def job_out(j: m.Job, with_log: bool = False) -> sc.JobOut:
    return sc.JobOut(
        id=j.id, kind=j.kind, state=j.state, machine=j.machine.name if j.machine else None, host=j.host_id,
        plan_run=j.plan_run_id, params=dict(j.params or {}), progress=j.progress, message=j.message,
        claimed_by=j.claimed_by, lease_expires_at=j.lease_expires_at, cancel_requested=j.cancel_requested,
        created_by=j.created_by, created_at=j.created_at, started_at=j.started_at, finished_at=j.finished_at,
        log=[sc.JobLogOut(at=x.at, line=x.line) for x in j.log] if with_log else None)


@router.get("/jobs", response_model=list[sc.JobOut], dependencies=[Depends(reader)])
def list_jobs(s: DB,
              state: Literal["queued", "running", "succeeded", "failed", "cancelled", "waiting_for_input"] | None
              = None,
              machine: str | None = Query(None, pattern=sc.NAME_PATTERN),
              kind: str | None = Query(None, pattern=r"^[a-z][a-z-]{0,31}$"),
              limit: int = Query(100, ge=1, le=1000)):
    """Newest first."""
    q = select(m.Job).order_by(m.Job.id.desc()).limit(limit)
    if state:
        q = q.where(m.Job.state == state)
    if kind:
        q = q.where(m.Job.kind == kind)
    if machine:
        q = q.join(m.Machine, m.Job.machine_id == m.Machine.id).where(m.Machine.name == machine)
    return [job_out(j) for j in s.scalars(q)]


def _job(s, job_id: int) -> m.Job:
    return by_id(s, m.Job, job_id, "job")


@router.get("/jobs/{job_id}", response_model=sc.JobOut, dependencies=[Depends(reader)])
def get_job(s: DB, job_id: int = JobId):
    return job_out(_job(s, job_id), with_log=True)


@router.post("/jobs/{job_id}/cancel", response_model=sc.JobOut)
def cancel_job(s: DB, request: Request, job_id: int = JobId, who: Principal = Depends(operator)):
    """Cancel at once a job nobody runs; ask the worker running one to stop (cancel_requested)."""
    note(request, f"job/{job_id}")
    j = _job(s, job_id)
    try:
        what = jobs.cancel(s, j, who.name)
    except ValueError as e:
        raise conflict(str(e)) from None
    note(request, f"job/{job_id}", result=what)
    if what == "cancelled":
        failover.withdrawn(s, j)                 # a failover nobody ran: the machine stays with its primary
    s.flush()
    s.refresh(j)
    return job_out(j, with_log=True)
