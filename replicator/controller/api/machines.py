"""Protected machines (operator to act, read-only to see). Every action is a desired-state change plus a job:
the job waits for the host that must carry it out (its `host`) and says so; the host channel reports how it
ends. Nothing here pretends a host did something it has not reported."""
from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response
from sqlalchemy import func, select
from sqlalchemy.orm import object_session

from .. import desired, failover, history, jobs
from .. import models as m
from .. import schemas as sc
from ..auth import Principal, operator, reader
from .common import DB, ERRORS, bump_revision, conflict, host_by_ref, note, one, ref
from .jobs import job_out

router = APIRouter(prefix="/v1", responses=ERRORS, tags=["machines"])
NamePath = Path(pattern=sc.NAME_PATTERN)


def extended_status(x: m.Machine) -> sc.MachineExtendedOut | None:
    """The machine's extended relationship: where its extended replica is, and the leg as the replica host
    last reported it (its report's "extended" list, else its status's replica.extended)."""
    pair = x.cloud.pair if x.cloud is not None else None
    ext = pair.extended if pair is not None else None
    if ext is None:
        return None
    third = x.extended_host
    out = sc.MachineExtendedOut(cloud=ext.cloud.name, host=third.hostname if third else None,
                                target=desired.extended_target(ext, third), state=None, health=None, reason=None,
                                last_success_at=None)
    report = x.replica_host.last_report if x.replica_host is not None else None
    legs = report.get("extended") if isinstance(report, dict) else None
    if not isinstance(legs, list) and isinstance(report, dict):
        replica = (report.get("status") or {}).get("replica") if isinstance(report.get("status"), dict) else None
        legs = replica.get("extended") if isinstance(replica, dict) else None
    leg = next((g for g in legs or [] if isinstance(g, dict) and g.get("machine") == x.name), None)
    if leg is None:
        return out
    stats = leg.get("stats") if isinstance(leg.get("stats"), dict) else {}
    out.state = str(leg["state"])[:64] if leg.get("state") is not None else None
    out.reason = str(leg["reason"])[:2000] if leg.get("reason") is not None else None
    out.health = str(stats["health"])[:32] if stats.get("health") is not None else None
    out.last_success_at = history.success_time(stats)
    return out


def machine_out(x: m.Machine) -> sc.MachineOut:
    return sc.MachineOut(
        id=x.id, name=x.name, cloud=x.cloud.name,
        primary_host=x.primary_host.hostname if x.primary_host else None,
        replica_host=x.replica_host.hostname if x.replica_host else None, domain=x.domain, disks=_disks(x.disks),
        excluded=list(x.excluded), policy=effective_policy(x).name if effective_policy(x) else None,
        desired_state=x.desired_state, observed_state=x.observed_state, health=x.health,
        rpo_seconds=x.rpo_seconds, last_success_at=x.last_success_at,
        owner_site=x.owner_site.name if x.owner_site else None, fencing_epoch=x.fencing_epoch,
        direction=failover.direction(object_session(x), x), created_at=x.created_at, extended=extended_status(x))


def effective_policy(x: m.Machine) -> m.ProtectionPolicy | None:
    """The machine's own policy, else its pair's."""
    if x.policy is not None:
        return x.policy
    pair = x.cloud.pair
    return pair.association.policy if pair and pair.association else None


def _state_job(s, x: m.Machine, kind: str, by: str, **params) -> m.Job:
    """Record a desired-state change for the machine's hosts and the job that follows it."""
    bump_revision(s, [x.primary_host_id, x.replica_host_id])
    s.flush()
    host = x.primary_host
    if host is None:
        msg = "waiting for a primary host to be placed (none is)"
    else:
        s.refresh(host)
        params["revision"] = host.desired_revision
        msg = f"waiting for host {host.hostname} to apply desired revision {host.desired_revision}"
    return jobs.enqueue(s, kind, machine=x, host_id=host.id if host else None, params=params, created_by=by,
                        message=msg)


def _same_auth(pair: m.CloudPair, policy: m.ProtectionPolicy | None) -> None:
    """A machine's own policy authenticates as its pair's does: the replica host has one listener, certificate
    or Kerberos, rendered from the pair's policy (desired.py)."""
    pair_policy = pair.association.policy if pair is not None and pair.association is not None else None
    if policy is None or pair_policy is None or "azure" in (policy.target_kind, pair_policy.target_kind):
        return
    if policy.auth != pair_policy.auth:
        raise HTTPException(422, f"policy: {policy.name!r} authenticates by {policy.auth}, the replica hosts of "
                                 f"pair {pair.name!r} by {pair_policy.auth} (its policy {pair_policy.name!r})")


def _place_replica(s, recovery: m.Cloud) -> m.Host | None:
    """The recovery cloud's host with the fewest replicas placed on it (ties: by hostname)."""
    load = (select(m.Host, func.count(m.Machine.id).label("n"))
            .outerjoin(m.Machine, m.Machine.replica_host_id == m.Host.id)
            .where(m.Host.cloud_id == recovery.id).group_by(m.Host.id).order_by("n", m.Host.hostname))
    row = s.execute(load).first()
    return row[0] if row else None


@router.get("/machines", response_model=list[sc.MachineOut], dependencies=[Depends(reader)])
def list_machines(s: DB, cloud: str | None = Query(None, pattern=sc.NAME_PATTERN)):
    q = select(m.Machine).order_by(m.Machine.name)
    if cloud is not None:
        q = q.join(m.Cloud, m.Machine.cloud_id == m.Cloud.id).where(m.Cloud.name == cloud)
    return [machine_out(x) for x in s.scalars(q)]


@router.post("/machines", status_code=201, response_model=sc.MachineOut)
def enable_protection(body: sc.MachineIn, s: DB, request: Request, who: Principal = Depends(operator)):
    """Enable protection of a machine in a paired primary cloud: placed on a replica host of the recovery
    cloud, following the pair's policy (or its own). A job tracks its hosts applying it."""
    note(request, f"machine/{body.name}", cloud=body.cloud)
    cloud = ref(s, m.Cloud, "cloud", "cloud", lock=True, name=body.cloud)       # its pair stays while we place
    if cloud.pair is None or cloud.pair_role != "primary":
        raise HTTPException(422, f"cloud: {cloud.name!r} is not the primary cloud of a pair")
    recovery = cloud.pair.cloud("recovery")
    policy = ref(s, m.ProtectionPolicy, "policy", "policy", name=body.policy) if body.policy else None
    if policy is None and cloud.pair.association is None:
        raise HTTPException(422, f"policy: pair {cloud.pair.name!r} has no policy; associate one or give policy")
    if s.scalar(select(m.Machine.id).where(m.Machine.name == body.name)):
        raise conflict(f"machine {body.name!r} is already protected")
    if body.primary_host:
        primary = host_by_ref(s, body.primary_host, "primary_host")
        if primary.cloud_id != cloud.id:
            raise HTTPException(422, f"primary_host: {primary.hostname!r} is not in cloud {cloud.name!r}")
    elif len(cloud.hosts) == 1:
        primary = cloud.hosts[0]
    elif not cloud.hosts:
        raise HTTPException(422, f"cloud: {cloud.name!r} has no hosts yet; put the host that runs {body.name!r} "
                                 f"in it (PUT /v1/hosts/HOST/cloud)")
    else:
        raise HTTPException(422, f"primary_host: cloud {cloud.name!r} has {len(cloud.hosts)} hosts; say which "
                                 f"one runs {body.name!r}")
    if body.replica_host:
        replica = host_by_ref(s, body.replica_host, "replica_host")
        if recovery is None or replica.cloud_id != recovery.id:
            raise HTTPException(422, f"replica_host: {replica.hostname!r} is not in the recovery cloud")
    else:
        replica = _place_replica(s, recovery) if recovery else None
    _same_auth(cloud.pair, policy)
    x = m.Machine(name=body.name, cloud=cloud, primary_host=primary, replica_host=replica, domain=body.domain,
                  disks=_disks(body.disks), excluded=list(body.excluded), policy=policy, desired_state="enabled",
                  owner_site_id=cloud.site_id)
    s.add(x)
    s.flush()
    desired.place_extended(s)
    job = _state_job(s, x, "enable-protection", who.name)
    if replica is None:
        jobs.log(s, job.id, f"no host in recovery cloud {recovery.name if recovery else '?'} yet: the replica "
                            f"side is placed when one joins")
    return machine_out(x)


@router.get("/machines/{name}", response_model=sc.MachineOut, dependencies=[Depends(reader)])
def get_machine(s: DB, name: str = NamePath):
    return machine_out(one(s, m.Machine, "machine", name=name))


@router.patch("/machines/{name}", response_model=sc.MachineOut)
def change_machine(body: sc.MachinePatch, s: DB, request: Request, name: str = NamePath,
                   who: Principal = Depends(operator)):
    """Change the policy or move the replica; a job tracks the primary host applying it."""
    given = body.model_fields_set
    note(request, f"machine/{name}", **{k: getattr(body, k) for k in given})
    x = one(s, m.Machine, "machine", lock=True, name=name)
    old_replica = x.replica_host_id
    changes = []
    if "policy" in given:
        x.policy = ref(s, m.ProtectionPolicy, "policy", "policy", name=body.policy) if body.policy else None
        if effective_policy(x) is None:
            raise HTTPException(422, f"policy: pair {x.cloud.pair.name!r} has no policy to follow")
        _same_auth(x.cloud.pair, x.policy)
        changes.append(f"policy {x.policy.name if x.policy else 'of the pair'}")
    if "replica_host" in given:
        if body.replica_host is None:
            raise HTTPException(422, "replica_host: a protected machine needs a replica host")
        replica = host_by_ref(s, body.replica_host, "replica_host")
        recovery = x.cloud.pair.cloud("recovery") if x.cloud.pair else None
        if recovery is None or replica.cloud_id != recovery.id:
            raise HTTPException(422, f"replica_host: {replica.hostname!r} is not in the recovery cloud")
        if replica.id != x.replica_host_id:
            _replica_movable(s, x)
            x.replica_host = replica
            changes.append(f"replica moves to {replica.hostname}")
    if changes:
        s.flush()                                            # replica_host_id follows the relationship now
        if old_replica != x.replica_host_id:
            bump_revision(s, [old_replica])                 # the old replica host drops it
        _state_job(s, x, "reconfigure-protection", who.name, changes=changes)
    return machine_out(x)


def _replica_movable(s, x: m.Machine) -> None:
    """A replica moves only while the machine runs on its primary host: failed over, committed, reversed or in
    a test failover, the replica host runs it (or its test copy), and a failover-family job names its hosts."""
    busy = failover.active_job(s, x)
    if busy is not None:
        raise conflict(f"machine {x.name!r} has job {busy.id} ({busy.kind}) under way: its replica cannot move")
    now = failover.direction(s, x)
    if now != "forward":
        raise conflict(f"machine {x.name!r} is {now}: its replica host runs it; the replica moves only once it is "
                       "back on its primary (fail back, or cancel the failover)")
    if failover.testing(s, x):
        raise conflict(f"machine {x.name!r} has a test failover on {x.replica_host.hostname if x.replica_host else '?'}"
                       ": clean it up before its replica moves")


# (action, states it applies from, desired state after, job kind)
ACTIONS = {"pause": (("enabled",), "paused", "pause-protection"),
           "resume": (("paused",), "enabled", "resume-protection"),
           "resync": (("enabled",), "enabled", "resync"),
           "disable": (("enabled", "paused"), "disabled", "disable-protection"),
           "enable": (("disabled",), "enabled", "enable-protection")}


def _act(action: str, s, request: Request, name: str, who: Principal) -> sc.JobOut:
    note(request, f"machine/{name}", action=action)
    x = one(s, m.Machine, "machine", lock=True, name=name)
    allowed, after, kind = ACTIONS[action]
    if x.desired_state not in allowed:
        raise conflict(f"machine {name!r} is {x.desired_state}: {action} applies to {' or '.join(allowed)}")
    x.desired_state = after
    if action == "resync":
        x.resync_requested += 1
    return job_out(_state_job(s, x, kind, who.name, desired_state=after))


def _action_route(action: str, doc: str):
    def route(s: DB, request: Request, name: str = NamePath, who: Principal = Depends(operator)):
        return _act(action, s, request, name, who)
    route.__name__ = f"{action}_machine"
    route.__doc__ = doc
    router.post(f"/machines/{{name}}/{action}", status_code=202, response_model=sc.JobOut)(route)


_action_route("pause", "Pause replication (the replica keeps its points).")
_action_route("resume", "Resume a paused machine's replication.")
_action_route("resync", "Ask for a resynchronization (compares both sides, sends what differs).")
_action_route("disable", "Disable protection (the pair's policy says whether the replica is deleted).")
_action_route("enable", "Enable protection again after a disable.")


@router.delete("/machines/{name}", status_code=204, response_class=Response)
def remove_machine(s: DB, request: Request, name: str = NamePath, _=Depends(operator)):
    """Forget a machine whose protection is disabled."""
    note(request, f"machine/{name}")
    x = one(s, m.Machine, "machine", lock=True, name=name)
    if x.desired_state != "disabled":
        raise conflict(f"machine {name!r} is {x.desired_state}: disable its protection first")
    if s.scalar(select(func.count()).select_from(m.PlanMember).where(m.PlanMember.machine_id == x.id)):
        raise conflict(f"machine {name!r} is in a recovery plan: take it out first")
    bump_revision(s, [x.primary_host_id, x.replica_host_id])      # their desired configuration loses it
    s.delete(x)


@router.post("/machines/{name}/failover", status_code=202, response_model=sc.JobOut)
def failover_machine(body: sc.FailoverIn, s: DB, request: Request, name: str = NamePath,
                     who: Principal = Depends(operator)):
    """Fail a machine over (controller/failover.py): planned (the primary's final cycle, then the replica),
    unplanned (the replica at once; refused while the primary holds a live lease, unless `force`) or test.
    The job follows the hosts running it."""
    note(request, f"machine/{name}", kind=body.kind, force=body.force, point=body.point)
    x = one(s, m.Machine, "machine", lock=True, name=name)
    return job_out(failover.request_failover(s, x, body.kind, body.force, body.point, who.name))


def _failover_step_route(kind: str, doc: str):
    def route(s: DB, request: Request, name: str = NamePath, who: Principal = Depends(operator)):
        note(request, f"machine/{name}", action=kind)
        x = one(s, m.Machine, "machine", lock=True, name=name)
        return job_out(failover.request_step(s, x, kind, who.name))
    route.__name__ = kind.replace("-", "_") + "_machine"
    route.__doc__ = doc
    router.post(f"/machines/{{name}}/{kind}", status_code=202, response_model=sc.JobOut)(route)


_failover_step_route("commit-failover", "Commit a failover: the machine stays on its recovery site.")
_failover_step_route("cancel-failover", "Cancel a failover not committed: the primary replicates again (its epoch "
                                        "is raised to the failover's, which lifts its fence).")
_failover_step_route("cleanup-test-failover", "Remove a test failover's machine and disks on the replica host.")


@router.post("/machines/{name}/reverse", status_code=202, response_model=sc.JobOut)
def reverse_machine(s: DB, request: Request, name: str = NamePath, who: Principal = Depends(operator)):
    """Reverse replication after a committed failover: the primary host stops protecting the machine and adopts
    its old disks as the replica, then the replica host, which runs the machine, replicates back into them
    (only differing blocks travel). 409 unless the machine's failover is committed."""
    note(request, f"machine/{name}", action="reverse")
    x = one(s, m.Machine, "machine", lock=True, name=name)
    return job_out(failover.request_reverse(s, x, who.name))


@router.post("/machines/{name}/failback", status_code=202, response_model=sc.JobOut)
def failback_machine(s: DB, request: Request, name: str = NamePath, who: Principal = Depends(operator)):
    """Planned failback while reverse replication runs: the replica host stops the machine and sends a final
    cycle, the primary host fails over to it (its own disk files), the replica host's disks become the replica
    again and the primary host protects the machine forward. The fencing epoch rises by one. 409 unless
    reverse replication runs."""
    note(request, f"machine/{name}", action="failback")
    x = one(s, m.Machine, "machine", lock=True, name=name)
    return job_out(failover.request_failback(s, x, who.name))


def _disks(disks):
    """A domain's {target: VHDX} as it is, a machine's disk files as a list."""
    return dict(disks) if isinstance(disks, dict) else list(disks or [])
