"""Recovery plans across hosts (definitions: admin; runs and confirmations: operator).

A plan names machines anywhere in one cloud pair, in up to 7 ordered groups with pre/post actions. A run is
recorded with a job; running it through the machines' hosts is the host channel's work, so a new run waits
(queued) and says so until a worker takes it. A manual action is confirmed here when a run waits on it.
"""
from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Path, Request, Response
from sqlalchemy import select

from .. import jobs
from .. import models as m
from .. import schemas as sc
from ..auth import Principal, admin, operator, reader
from .common import DB, ERRORS, by_id, conflict, note, one, ref

router = APIRouter(prefix="/v1", responses=ERRORS, tags=["plans"])
NamePath = Path(pattern=sc.NAME_PATTERN)
RunId = Path(ge=1, le=2 ** 31 - 1)


def _action_out(a: m.PlanAction) -> sc.ActionOut:
    return sc.ActionOut(id=a.id, phase=a.phase, script=a.script, manual=a.manual, timeout=a.timeout, kinds=a.kinds)


def plan_out(p: m.RecoveryPlan) -> sc.PlanOut:
    groups = [sc.GroupOut(position=g.position, members=sorted(x.machine.name for x in g.members),
                          pre=[_action_out(a) for a in g.actions if a.phase == "pre"],
                          post=[_action_out(a) for a in g.actions if a.phase == "post"]) for g in p.groups]
    return sc.PlanOut(id=p.id, name=p.name, pair=p.pair.name, description=p.description, groups=groups,
                      created_at=p.created_at)


def _fill(s, plan: m.RecoveryPlan, body: sc.PlanIn) -> None:
    """Groups, members (machines of the plan's pair) and actions from the request."""
    pair = ref(s, m.CloudPair, "pair", "pair", name=body.pair)
    cloud_ids = {c.id for c in pair.clouds}
    plan.pair = pair
    plan.description = body.description
    plan.groups = []
    s.flush()
    for k, g in enumerate(body.groups, 1):
        group = m.PlanGroup(position=k)
        plan.groups.append(group)
        for name in g.members:
            x = ref(s, m.Machine, "machine", f"groups[{k - 1}].members", name=name)
            if x.cloud_id not in cloud_ids:
                raise HTTPException(422, f"groups[{k - 1}].members: {name!r} is not protected in pair {pair.name!r}")
            group.members.append(m.PlanMember(plan_id=plan.id, machine=x))
        for phase in ("pre", "post"):
            for i, a in enumerate(getattr(g, phase)):
                group.actions.append(m.PlanAction(
                    phase=phase, position=i, action_kind="script" if a.script else "manual", script=a.script,
                    manual=a.manual, timeout=a.timeout, kinds=a.kinds))
    s.flush()


@router.get("/plans", response_model=list[sc.PlanOut], dependencies=[Depends(reader)])
def list_plans(s: DB):
    return [plan_out(p) for p in s.scalars(select(m.RecoveryPlan).order_by(m.RecoveryPlan.name))]


@router.post("/plans", status_code=201, response_model=sc.PlanOut)
def create_plan(body: sc.PlanIn, s: DB, request: Request, _=Depends(admin)):
    note(request, f"plan/{body.name}")
    if s.scalar(select(m.RecoveryPlan.id).where(m.RecoveryPlan.name == body.name)):
        raise conflict(f"plan {body.name!r} already exists")
    plan = m.RecoveryPlan(name=body.name, pair=ref(s, m.CloudPair, "pair", "pair", name=body.pair))
    s.add(plan)
    _fill(s, plan, body)
    return plan_out(plan)


@router.get("/plans/{name}", response_model=sc.PlanOut, dependencies=[Depends(reader)])
def get_plan(s: DB, name: str = NamePath):
    return plan_out(one(s, m.RecoveryPlan, "plan", name=name))


def _active_run(s, plan: m.RecoveryPlan) -> m.PlanRun | None:
    return s.scalar(select(m.PlanRun).where(m.PlanRun.plan_id == plan.id,
                                            m.PlanRun.state.in_(("queued", "running", "waiting_for_input"))))


@router.put("/plans/{name}", response_model=sc.PlanOut)
def replace_plan(body: sc.PlanIn, s: DB, request: Request, name: str = NamePath, _=Depends(admin)):
    """Replace the plan's groups and actions (not while a run of it is in progress)."""
    note(request, f"plan/{name}")
    plan = one(s, m.RecoveryPlan, "plan", lock=True, name=name)
    if body.name != name:
        raise conflict(f"name: a plan is not renamed ({body.name!r} != {name!r})")
    if _active_run(s, plan):
        raise conflict(f"plan {name!r} has a run in progress")
    _fill(s, plan, body)
    return plan_out(plan)


@router.delete("/plans/{name}", status_code=204, response_class=Response)
def delete_plan(s: DB, request: Request, name: str = NamePath, _=Depends(admin)):
    note(request, f"plan/{name}")
    plan = one(s, m.RecoveryPlan, "plan", lock=True, name=name)
    if _active_run(s, plan):
        raise conflict(f"plan {name!r} has a run in progress")
    s.delete(plan)


# ---------------------------------------------------------------------------------------------- runs
def run_out(s, r: m.PlanRun) -> sc.PlanRunOut:
    job_id = s.scalar(select(m.Job.id).where(m.Job.plan_run_id == r.id).order_by(m.Job.id).limit(1))
    return sc.PlanRunOut(id=r.id, plan=r.plan.name, kind=r.kind, state=r.state, current_group=r.current_group,
                         waiting_action_id=r.waiting_action_id, confirmations=list(r.confirmations or []),
                         forced=r.forced, created_by=r.created_by, created_at=r.created_at,
                         finished_at=r.finished_at, job=job_id)


@router.post("/plans/{name}/runs", status_code=202, response_model=sc.PlanRunOut)
def start_run(body: sc.PlanRunIn, s: DB, request: Request, name: str = NamePath,
              who: Principal = Depends(operator)):
    """Ask for a test, planned or unplanned failover of the whole plan; one run of a plan at a time."""
    note(request, f"plan/{name}", kind=body.kind, force=body.force)
    plan = one(s, m.RecoveryPlan, "plan", lock=True, name=name)
    if _active_run(s, plan):
        raise conflict(f"plan {name!r} already has a run in progress")
    run = m.PlanRun(plan=plan, kind=body.kind, forced=body.force, created_by=who.name)
    s.add(run)
    s.flush()
    jobs.enqueue(s, "plan-run", plan_run_id=run.id, params={"plan": name, "kind": body.kind, "force": body.force},
                 created_by=who.name, message=f"{body.kind} failover of plan {name}: waiting for a worker to "
                                              f"drive its groups through the hosts")
    return run_out(s, run)


@router.get("/plans/{name}/runs", response_model=list[sc.PlanRunOut], dependencies=[Depends(reader)])
def list_runs(s: DB, name: str = NamePath):
    plan = one(s, m.RecoveryPlan, "plan", name=name)
    return [run_out(s, r) for r in s.scalars(select(m.PlanRun).where(m.PlanRun.plan_id == plan.id)
                                              .order_by(m.PlanRun.id.desc()))]


def _run(s, run_id: int) -> m.PlanRun:
    return by_id(s, m.PlanRun, run_id, "plan run")


@router.get("/plan-runs/{run_id}", response_model=sc.PlanRunOut, dependencies=[Depends(reader)])
def get_run(s: DB, run_id: int = RunId):
    return run_out(s, _run(s, run_id))


@router.post("/plan-runs/{run_id}/confirm", response_model=sc.PlanRunOut)
def confirm_action(body: sc.ConfirmIn, s: DB, request: Request, run_id: int = RunId,
                   who: Principal = Depends(operator)):
    """Confirm the manual action a run waits on; the run goes on."""
    note(request, f"plan-run/{run_id}", action_id=body.action_id)
    r = by_id(s, m.PlanRun, run_id, "plan run", lock=True)
    if r.state != "waiting_for_input" or r.waiting_action_id is None:
        raise conflict(f"plan run {run_id} is {r.state}, not waiting for a manual action")
    if body.action_id != r.waiting_action_id:
        raise conflict(f"plan run {run_id} waits on action {r.waiting_action_id}, not {body.action_id}")
    r.confirmations = [*(r.confirmations or []), {"action_id": body.action_id, "by": who.name,
                                                  "at": m.utcnow().isoformat(), "note": body.note}]
    r.waiting_action_id, r.state = None, "running"
    for job_id in s.scalars(select(m.Job.id).where(m.Job.plan_run_id == r.id)):
        jobs.log(s, job_id, f"manual action {body.action_id} confirmed by {who.name}"
                            + (f": {body.note}" if body.note else ""))
    s.flush()
    return run_out(s, r)
