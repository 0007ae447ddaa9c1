"""A machine's past as the controller kept it (controller/history.py): its RPO samples, the recovery points its
replica host last reported, and the audit entries that name it. Read-only and up."""
from __future__ import annotations

import datetime as dt

from fastapi import APIRouter, Depends, HTTPException, Path, Query
from pydantic import BaseModel, Field
from sqlalchemy import select

from .. import history as hi
from .. import models as m
from .. import schemas as sc
from ..auth import reader
from .common import DB, ERRORS, one

router = APIRouter(prefix="/v1", responses=ERRORS, tags=["machines"], dependencies=[Depends(reader)])
NamePath = Path(pattern=sc.NAME_PATTERN)
WHEN = "ISO 8601 date-time (UTC if no zone) or seconds since the epoch"


class SampleOut(BaseModel):
    at: dt.datetime
    rpo_seconds: float | None = Field(description="the RPO achieved then: age of the newest replicated data")
    last_success_at: dt.datetime | None
    pending_bytes: int | None = Field(description="changed bytes tracked, not replicated yet")
    cycle_bytes: int | None = Field(description="the last cycle's bytes sent, if the host reported it")
    cycle_seconds: float | None = Field(description="the last cycle's duration, if the host reported it")
    health: str | None
    state: str | None


class HistoryOut(BaseModel):
    machine: str
    since: dt.datetime
    until: dt.datetime
    every_seconds: int = Field(description="at most one sample per this many seconds")
    retention_seconds: int = Field(description="samples older than this are pruned")
    samples: list[SampleOut] = Field(description="oldest first")


class PointOut(BaseModel):
    point: int = Field(description="the machine's recovery point number (one cut across its disks)")
    time: dt.datetime = Field(description="when its data is from")
    consistency: str = Field(description="crash or application")
    generations: dict[str, int] = Field(description="each disk's generation (by disk id) at this point")


class PointsOut(BaseModel):
    machine: str
    host: str | None = Field(description="the replica host that reported them (none yet: null)")
    reported_at: dt.datetime | None
    points: list[PointOut] = Field(description="oldest first; the newest history.MAX_POINTS")


def _when(name: str, value: str | None) -> dt.datetime | None:
    if value is None:
        return None
    try:
        try:
            when = dt.datetime.fromtimestamp(float(value), dt.timezone.utc)
        except ValueError:
            when = dt.datetime.fromisoformat(value)
            when = when.astimezone(dt.timezone.utc) if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)
    except ValueError:
        raise HTTPException(422, f"{name}: must be an {WHEN}, not {value[:64]!r}") from None
    except (OverflowError, OSError):
        raise HTTPException(422, f"{name}: {value[:64]!r} is out of range") from None
    return when


@router.get("/machines/{name}/history", response_model=HistoryOut)
def machine_history(s: DB, name: str = NamePath,
                    since: str | None = Query(None, max_length=64, description=f"{WHEN}; default: "
                                              "until minus the retention window"),
                    until: str | None = Query(None, max_length=64, description=f"{WHEN}; default: now")):
    """The machine's RPO samples between since and until, oldest first (RPO, last success, pending bytes,
    the last cycle's size and duration): one per minute at most, kept seven days."""
    x = one(s, m.Machine, "machine", name=name)
    end = _when("until", until) or m.utcnow()
    start = _when("since", since) or end - hi.RETENTION
    if start > end:
        raise HTTPException(422, f"since ({start.isoformat()}) is after until ({end.isoformat()})")
    rows = s.scalars(select(hi.RpoSample).where(hi.RpoSample.machine_id == x.id, hi.RpoSample.at >= start,
                                                hi.RpoSample.at <= end).order_by(hi.RpoSample.at, hi.RpoSample.id))
    return HistoryOut(machine=x.name, since=start, until=end, every_seconds=int(hi.SAMPLE_EVERY.total_seconds()),
                      retention_seconds=int(hi.RETENTION.total_seconds()),
                      samples=[SampleOut.model_validate(r, from_attributes=True) for r in rows])


@router.get("/machines/{name}/points", response_model=PointsOut)
def machine_points(s: DB, name: str = NamePath):
    """The recovery points the machine's replica host last reported (time, consistency, disks' generations)."""
    x = one(s, m.Machine, "machine", name=name)
    row = s.get(hi.MachinePoints, x.id)
    if row is None:
        return PointsOut(machine=x.name, host=None, reported_at=None, points=[])
    host = s.get(m.Host, row.host_id) if row.host_id else None
    return PointsOut(machine=x.name, host=host.hostname if host else None, reported_at=row.reported_at,
                     points=[PointOut(**p) for p in row.points])


@router.get("/machines/{name}/audit", response_model=list[sc.AuditOut], tags=["access"])
def machine_audit(s: DB, name: str = NamePath, limit: int = Query(100, ge=1, le=1000)):
    """The audit entries whose target is this machine (machine/NAME), newest first. The machine need not
    exist any more: its entries outlive it."""
    q = (select(m.AuditEntry).where(m.AuditEntry.target == f"machine/{name}")
         .order_by(m.AuditEntry.id.desc()).limit(limit))
    return [sc.AuditOut.model_validate(a) for a in s.scalars(q)]
