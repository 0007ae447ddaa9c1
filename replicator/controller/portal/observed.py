"""What the hosts last reported about each machine, as they reported it: the entry of the host protecting it
(state, health and its reasons, cycle statistics, pending bytes, disks' tracking, the last cycle) and that of
the host holding its replica, if its report names the machine. That is its primary and its replica host, the
other way round while its direction is reversed (its recovery host protects it back to its primary host).
The machine's own document carries only the summary the controller keeps (state, health, RPO, last success);
this is the detail an operator needs to see why a machine is behind.
Read-only, from the reports the host channel stores (hosts.last_report)."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field
from sqlalchemy import select

from .. import auth, history
from .. import models as m
from .. import schemas as sc
from ..api.common import DB, ERRORS, one

router = APIRouter(prefix="/v1", responses=ERRORS, tags=["machines"])


class ObservedSide(BaseModel):
    host: str = Field(description="the reporting host's hostname")
    received_at: str | None = Field(description="when the controller received that report")
    entry: dict = Field(description="the machine's entry in the host's status document, as the host sent it")


class ObservedMachine(BaseModel):
    machine: str
    primary: ObservedSide | None = Field(description="the protecting host's entry (the replica host's while reversed)")
    replica: ObservedSide | None = Field(description="the replica-holding host's (the primary host's while reversed)")


def _side(host: m.Host | None, name: str) -> ObservedSide | None:
    report = host.last_report if host is not None and isinstance(host.last_report, dict) else None
    status = report.get("status") if report else None
    entries = status.get("machines") if isinstance(status, dict) else None
    for e in entries if isinstance(entries, list) else []:
        if isinstance(e, dict) and e.get("name") == name:
            return ObservedSide(host=host.hostname, received_at=report.get("received_at"), entry=e)
    return None


@router.get("/observed/machines", response_model=list[ObservedMachine], dependencies=[Depends(auth.reader)])
def observed_machines(s: DB, machine: str | None = Query(None, pattern=sc.NAME_PATTERN)):
    """Each machine's latest entries in its primary and replica hosts' reports (one machine with ?machine=)."""
    q = select(m.Machine).order_by(m.Machine.name)
    if machine is not None:
        one(s, m.Machine, "machine", name=machine)
        q = q.where(m.Machine.name == machine)
    machines = list(s.scalars(q))
    reversed_ = history.reversed_ids(s, machines)
    out = []
    for x in machines:
        # while reversed, the recovery host protects the machine and the primary host holds its replica
        protecting, holding = (x.replica_host, x.primary_host) if x.id in reversed_ else (x.primary_host,
                                                                                          x.replica_host)
        out.append(ObservedMachine(machine=x.name, primary=_side(protecting, x.name), replica=_side(holding, x.name)))
    return out
