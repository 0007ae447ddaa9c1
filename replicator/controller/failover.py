"""Failover of a machine through the controller (issue 14, docs/management-plane.md "Fencing"): the decision
and the epochs live here, the hosts carry the work out.

A failover-family job (`failover` of kind test/planned/unplanned, `commit-failover`, `cancel-failover`,
`cleanup-test-failover`) names one step at a time in its params: `op` (the operation the host runs) on its
`host_id`. desired.py renders that step in the host's `operations` as `{"site": {"job", "op", "planned",
"point"}}`; the agent (daemon/agent.py) runs it once and reports `operations[MACHINE]["site"] = {"job", "op",
"state": running|succeeded|failed, "error", "epoch", "point"}`; `follow()` (called by each report) takes the
job for that host (claimed_by `host:NAME` under a lease the reports renew) and moves it on. The controller
never calls a host.

Epochs (the fencing engineer's contract): a planned or unplanned failover raises the machine's epoch by one
and gives the machine to the recovery site in the request's transaction; the replica raises its disks' epoch
by itself, and the controller keeps the higher of both. The old primary keeps the epoch it had (`epoch_from`),
so its next cycle is refused by the replica (fenced) -- a fenced primary's epoch is never raised here. A
cancelled failover gives the machine back with the new epoch, which lifts the original primary's fence.

Reverse replication and failback (jobs `reverse` and `failback`, STEPS below) run the same way, one host step
after another. The roles swap in `direction()` -- derived from the machine's succeeded jobs -- rather than in
its host columns: the primary host keeps its disks and configuration, the replica host its failed-over disks.
While reverse replication is asked, runs or is failed back, the primary host renders a [replica] allowing the
replica host (desired.py). A failback raises the epoch by one and gives the machine to its primary's site in
the request's transaction, as a failover does.

An unplanned failover while the primary still holds a live lease (its last report younger than LEASE_TTL shows
the machine cycling, not fenced, at the current epoch) is refused unless forced; a forced one is an audit entry
and a job note.
"""
from __future__ import annotations

import datetime as dt

from fastapi import HTTPException
from sqlalchemy import select
from sqlalchemy.orm import Session

from . import jobs
from . import models as m
from .api.common import bump_revision

LEASE_TTL = dt.timedelta(seconds=60)
SITE_KINDS = ("failover", "commit-failover", "cancel-failover", "cleanup-test-failover", "reverse", "failback")
DIRECTION_KINDS = ("failover", "commit-failover", "cancel-failover", "reverse", "failback")
ACTIVE = ("queued", "running")


def _worker(host: m.Host) -> str:
    return f"host:{host.hostname}"


def active_job(s: Session, x: m.Machine) -> m.Job | None:
    return s.scalars(select(m.Job).where(m.Job.machine_id == x.id, m.Job.kind.in_(SITE_KINDS),
                                         m.Job.state.in_(ACTIVE)).order_by(m.Job.id).limit(1)).first()


def _last_done(s: Session, x: m.Machine, kinds: tuple[str, ...], test: bool) -> m.Job | None:
    """The newest succeeded job of these kinds for the machine (failover jobs of the test kind or not)."""
    for job in s.scalars(select(m.Job).where(m.Job.machine_id == x.id, m.Job.kind.in_(kinds),
                                             m.Job.state == "succeeded").order_by(m.Job.id.desc())):
        if job.kind != "failover" or (job.params.get("kind") == "test") == test:
            return job
    return None


def failed_over(s: Session, x: m.Machine) -> m.Job | None:
    """The failover that gave the machine to its recovery site and is neither committed nor cancelled."""
    last = _last_done(s, x, ("failover", "commit-failover", "cancel-failover"), test=False)
    return last if last is not None and last.kind == "failover" else None


def testing(s: Session, x: m.Machine) -> bool:
    last = _last_done(s, x, ("failover", "cleanup-test-failover"), test=True)
    return last is not None and last.kind == "failover"


def direction(s: Session, x: m.Machine) -> str:
    """Where the machine runs and which way it replicates, from its newest succeeded failover-family job:
    "forward" (its primary host runs it, replicating to its replica host), "failed-over" (its replica host runs
    it; commit or cancel), "committed" (its replica host runs it, nothing replicates: reverse next) or
    "reversed" (its replica host runs it and replicates back to its primary host: failback next). The roles swap
    in this derived direction, not in the machine's host columns: the disks each host holds stay its own."""
    last = _last_done(s, x, DIRECTION_KINDS, test=False)
    if last is None or last.kind in ("cancel-failover", "failback"):
        return "forward"
    return {"failover": "failed-over", "commit-failover": "committed", "reverse": "reversed"}[last.kind]


def reverse_source(s: Session, x: m.Machine) -> bool:
    """The machine's primary host must serve a replica for it: reverse replication is asked, runs, or a
    failback has not ended yet."""
    busy = active_job(s, x)
    return (busy is not None and busy.kind in ("reverse", "failback")) or direction(s, x) == "reversed"


def _owned_by_primary(x: m.Machine) -> bool:
    return x.primary_host is not None and x.owner_site_id in (None, x.primary_host.site_id)


def primary_epoch(s: Session, x: m.Machine) -> int:
    """The epoch handed to the machine's primary host: the machine's while its site owns it; else the one it
    had before the failover (a fenced primary's epoch is never raised by the controller)."""
    if _owned_by_primary(x):
        return x.fencing_epoch
    job = s.scalars(select(m.Job).where(m.Job.machine_id == x.id, m.Job.kind == "failover",
                                        m.Job.state.in_(("queued", "running", "succeeded")))
                    .order_by(m.Job.id.desc())).first()
    held = (job.params or {}).get("epoch_from") if job is not None else None
    return held if isinstance(held, int) else x.fencing_epoch


def roles(x: m.Machine) -> tuple[str, str]:
    """(primary host's role, replica host's role) in the fencing table: the owner's host is the primary."""
    return ("primary", "replica") if _owned_by_primary(x) else ("replica", "primary")


def host_operations(s: Session, host: m.Host) -> dict:
    """{machine: {"site": step}} for the failover steps this host is to run (desired.py renders them)."""
    out = {}
    for job in s.scalars(select(m.Job).where(m.Job.host_id == host.id, m.Job.kind.in_(SITE_KINDS),
                                             m.Job.state.in_(ACTIVE)).order_by(m.Job.id)):
        if job.machine is None or job.machine.name in out:
            continue
        p = job.params
        step = {"job": job.id, "op": p["op"], "planned": bool(p.get("planned")), "point": p.get("point")}
        if p.get("args"):
            step["args"] = p["args"]                     # reverse and accept-reverse settings
        out[job.machine.name] = {"site": step}
    return out


# ---------------------------------------------------------------------------------------------- requests
def live_lease(x: m.Machine) -> tuple[str, float] | None:
    """Why the primary still holds the machine (its last report, young enough, shows it cycling at the
    current epoch, not fenced) and the report's age, or None when it does not."""
    host = x.primary_host
    if host is None or not _owned_by_primary(x) or not host.last_report:
        return None
    try:
        age = (m.utcnow() - dt.datetime.fromisoformat(host.last_report["received_at"])).total_seconds()
    except (KeyError, TypeError, ValueError):
        return None
    if age >= LEASE_TTL.total_seconds():
        return None
    entry = next((e for e in (host.last_report.get("status") or {}).get("machines") or []
                  if isinstance(e, dict) and e.get("name") == x.name), None)
    from ..daemon.primary import CYCLING_STATES              # (the daemon's, loaded only when asked)
    if entry is None or entry.get("fenced") or entry.get("epoch") != x.fencing_epoch \
            or entry.get("state") not in {st.name for st in CYCLING_STATES}:
        return None
    return (f"host {host.hostname} still holds machine {x.name!r}: its report {age:.0f} s ago shows it "
            f"{entry.get('state')} at epoch {x.fencing_epoch} (lease {LEASE_TTL.total_seconds():.0f} s)"), age


def request_failover(s: Session, x: m.Machine, kind: str, force: bool, point: int | None, who: str) -> m.Job:
    """Record a failover (the caller holds the machine's row): epoch and owner for planned/unplanned, and the
    job's first step -- the primary's final cycle for planned, the replica's failover otherwise."""
    if x.desired_state == "disabled":
        raise HTTPException(409, f"machine {x.name!r} is not protected (disabled)")
    if x.replica_host is None:
        raise HTTPException(409, f"machine {x.name!r} has no replica host placed: nothing to fail over to")
    busy = active_job(s, x)
    if busy is not None:
        raise HTTPException(409, f"machine {x.name!r} has job {busy.id} ({busy.kind}) under way: wait for it or "
                                 "cancel it")
    if kind == "test":
        if testing(s, x):
            raise HTTPException(409, f"machine {x.name!r} has a test failover running: clean it up first")
        return _step_job(s, x, "failover", x.replica_host, who, kind="test", op="test-failover", point=point)
    if failed_over(s, x) is not None or not _owned_by_primary(x):
        then = ("commit or cancel that failover" if failed_over(s, x) is not None else
                f"its direction is {direction(s, x)}: reverse replication and fail back first")
        raise HTTPException(409, f"machine {x.name!r} is failed over already: {then}")
    if kind == "planned" and x.primary_host is None:
        raise HTTPException(409, f"machine {x.name!r} has no primary host: only an unplanned failover applies")
    if kind == "planned" and point is not None:
        raise HTTPException(422, "point: a planned failover takes the final cycle's point")
    held = live_lease(x) if kind == "unplanned" else None
    if held is not None and not force:
        raise HTTPException(409, f"{held[0]}: an unplanned failover now needs force")
    epoch_from = x.fencing_epoch
    x.fencing_epoch = epoch_from + 1                     # one transaction: epoch and owner together
    x.owner_site_id = x.replica_host.site_id
    x.owner_lease_expires = None
    extra = {"kind": kind, "force": force, "epoch_from": epoch_from, "epoch_to": x.fencing_epoch}
    if kind == "planned":
        job = _step_job(s, x, "failover", x.primary_host, who, op="planned-failover", **extra)
    else:
        job = _step_job(s, x, "failover", x.replica_host, who, op="failover", point=point, **extra)
    if held is not None:
        detail = {"machine": x.name, "epoch_from": epoch_from, "epoch_to": x.fencing_epoch,
                  "lease_age_seconds": round(held[1], 1), "forced": True, "job": job.id}
        s.add(m.AuditEntry(actor=who, action="machine.failover.forced", target=f"machine/{x.name}", detail=detail))
        jobs.log(s, job.id, f"forced by {who}: {held[0]}; epoch {epoch_from} -> {x.fencing_epoch}")
    elif force:
        jobs.log(s, job.id, f"force given by {who}, not needed: the primary held no live lease")
    return job


def request_step(s: Session, x: m.Machine, kind: str, who: str) -> m.Job:
    """commit-failover, cancel-failover or cleanup-test-failover, run by the replica host."""
    busy = active_job(s, x)
    if busy is not None:
        raise HTTPException(409, f"machine {x.name!r} has job {busy.id} ({busy.kind}) under way: wait for it")
    if x.replica_host is None:
        raise HTTPException(409, f"machine {x.name!r} has no replica host")
    if kind == "cleanup-test-failover":
        if not testing(s, x):
            raise HTTPException(409, f"machine {x.name!r} has no test failover to clean up")
    elif failed_over(s, x) is None:
        raise HTTPException(409, f"machine {x.name!r} has no failover waiting for commit or cancel")
    return _step_job(s, x, kind, x.replica_host, who, op=kind)


# Reverse replication and failback: each a job of host steps run in this order ("primary" = the machine's
# primary host, the original site; "replica" = its replica host, where it failed over).
STEPS = {
    "reverse": (("primary", "accept-reverse"),     # stop protecting there; its old disks become the replica
                ("replica", "reverse")),           # the failed-over machine replicates back into them
    "failback": (("replica", "planned-failover"),  # the recovery site stops the machine, final cycle: FailbackComplete
                 ("primary", "failover"),          # planned failover on the original site: its own disk files
                 ("replica", "accept-reverse"),    # the recovery site's disks become the replica again
                 ("primary", "reverse")),          # the configured machine is protected again, forward
}


def _reverse_settings(x: m.Machine) -> dict:
    """The protection of the way back (the host adds its certificate files): the machine's policy, aimed at
    its primary host's data URL, where that host's [replica] listens while reverse replication runs."""
    from .desired import _listen, _machine_policy, copy_rate
    policy = _machine_policy(x)
    host, port = _listen(x.primary_host.data_url, 8084)
    return {"target": f"https://{host}:{port}", "frequency": policy.frequency,
            "additional_points": policy.additional_points, "compression": policy.compression,
            "bandwidth_limit": policy.bandwidth_limit or "none", **copy_rate(policy)}


def _step_params(x: m.Machine, kind: str, index: int) -> tuple[m.Host, dict]:
    side, op = STEPS[kind][index]
    host, other = (x.primary_host, x.replica_host) if side == "primary" else (x.replica_host, x.primary_host)
    params: dict = {"op": op, "step": index}
    if op == "accept-reverse":
        params["args"] = {"from": other.id, "force": kind == "reverse"}
    elif op == "reverse":
        params["args"] = {"settings": _reverse_settings(x) if kind == "reverse" else {}}
    elif op == "failover":
        params["planned"] = True
    return host, params


def _protected(x: m.Machine, what: str) -> None:
    """Reverse and failback render the way back only for a machine whose protection is not disabled
    (desired.py's `reversing`): a disabled one would be asked to replicate to a host that does not listen."""
    if x.desired_state == "disabled":
        raise HTTPException(409, f"machine {x.name!r} is disabled: {what} needs its protection enabled first")


def _idle_and_protected(s: Session, x: m.Machine, what: str) -> None:
    busy = active_job(s, x)
    if busy is not None:
        raise HTTPException(409, f"machine {x.name!r} has job {busy.id} ({busy.kind}) under way: wait for it")
    _protected(x, what)


def request_reverse(s: Session, x: m.Machine, who: str) -> m.Job:
    """Reverse replication after a committed failover: the original primary host accepts (force: the controller
    gave the machine to the recovery site, whatever that host last saw), then the replica host protects the
    failed-over machine back to it. No epoch change: the recovery site owns the machine already."""
    _idle_and_protected(s, x, "reverse replication")
    now = direction(s, x)
    if now != "committed":
        raise HTTPException(409, f"machine {x.name!r} is {now}: reverse replication needs a committed failover"
                                 + (" (commit it first)" if now == "failed-over" else ""))
    if x.primary_host is None or x.replica_host is None:
        raise HTTPException(409, f"machine {x.name!r} lacks a primary or replica host: nothing to reverse to")
    from .desired import _machine_policy
    policy = _machine_policy(x)
    if policy is None or policy.target_kind != "peer" or policy.auth != "certificate":
        raise HTTPException(409, f"machine {x.name!r}: reverse replication through the controller needs a peer "
                                 "policy with certificate authentication")
    if not x.primary_host.data_url:
        raise HTTPException(409, f"host {x.primary_host.hostname} registered no data URL: it cannot receive the "
                                 "reverse replication")
    host, params = _step_params(x, "reverse", 0)
    bump_revision(s, [x.replica_host_id])              # (the primary host's [replica] comes with its step)
    return _step_job(s, x, "reverse", host, who, **params)


def request_failback(s: Session, x: m.Machine, who: str) -> m.Job:
    """A planned failover back to the original site, which then protects the machine forward again: the epoch
    rises by one and the machine belongs to its primary host's site from this transaction on."""
    _idle_and_protected(s, x, "failback")
    now = direction(s, x)
    if now != "reversed":
        raise HTTPException(409, f"machine {x.name!r} is {now}: failback needs reverse replication running "
                                 "(POST /v1/machines/NAME/reverse after a committed failover)")
    epoch_from = x.fencing_epoch
    x.fencing_epoch = epoch_from + 1
    x.owner_site_id = x.primary_host.site_id
    x.owner_lease_expires = None
    host, params = _step_params(x, "failback", 0)
    bump_revision(s, [x.primary_host_id])
    return _step_job(s, x, "failback", host, who, epoch_from=epoch_from, epoch_to=x.fencing_epoch, **params)


def _step_job(s: Session, x: m.Machine, job_kind: str, host: m.Host, who: str, **params) -> m.Job:
    """(The other host's revision rises by itself if its rendering changed: desired.current.)"""
    bump_revision(s, [host.id])
    return jobs.enqueue(s, job_kind, machine=x, host_id=host.id, params=params, created_by=who,
                        message=f"{params['op']}: waiting for host {host.hostname} to run it")


def withdrawn(s: Session, job: m.Job) -> None:
    """A failover job cancelled before a host ran its replica step: the machine goes back to its primary with
    the new epoch (a cancelled failover keeps E+1, which the original primary is handed). A failback cancelled
    before its first step stays reversed with the recovery site; one cancelled later keeps its owner (a host
    may run the machine already), as a failed step does (_stopped_at)."""
    x = job.machine
    if job.kind in STEPS and x is not None and job.params.get("step", 0) > 0:
        # the hosts moved already (the machine may run on its primary host again): the owner stays as it is
        done = ", ".join(op for _, op in STEPS[job.kind][:job.params["step"]])
        jobs.log(s, job.id, f"the hosts ran {done} already: finish the remaining steps on them (docs/operations.md)"
                            f" or ask {job.kind} again; machine {x.name} stays at epoch {x.fencing_epoch}")
        return
    if job.kind == "failback" and x is not None and x.replica_host is not None:
        x.owner_site_id = x.replica_host.site_id          # still reversed: the recovery site keeps it (epoch kept)
        bump_revision(s, [x.primary_host_id, x.replica_host_id])
        jobs.log(s, job.id, f"machine {x.name} stays with {x.replica_host.hostname}, at epoch {x.fencing_epoch}")
        return
    if job.kind != "failover" or job.params.get("kind") == "test" or x is None or x.primary_host is None:
        return
    x.owner_site_id = x.primary_host.site_id
    bump_revision(s, [x.primary_host_id, x.replica_host_id])
    jobs.log(s, job.id, f"machine {x.name} stays with {x.primary_host.hostname}, at epoch {x.fencing_epoch}")


# ---------------------------------------------------------------------------------------------- reports
def follow(s: Session, host: m.Host, operations: dict) -> None:
    """A host's report: its failover steps move their jobs on; its live machines renew their owner lease."""
    now = m.utcnow()
    for x in s.scalars(select(m.Machine).where(m.Machine.primary_host_id == host.id)):
        if _owned_by_primary(x):
            x.owner_lease_expires = now + LEASE_TTL
    for job_id in s.scalars(select(m.Job.id).where(m.Job.host_id == host.id, m.Job.kind.in_(SITE_KINDS),
                                                   m.Job.state.in_(ACTIVE)).order_by(m.Job.id)).all():
        job = s.get(m.Job, job_id)
        rec = (operations.get(job.machine.name) or {}).get("site") if job.machine is not None else None
        if not isinstance(rec, dict) or rec.get("job") != job.id or rec.get("op") != job.params.get("op"):
            continue
        x = s.get(m.Machine, job.machine_id, with_for_update=True)      # machines, then jobs (as the routes)
        job = s.get(m.Job, job_id, with_for_update=True, populate_existing=True)
        if job.state not in ACTIVE:
            continue
        if rec.get("state") == "running":
            if job.state == "queued" or job.claimed_by != _worker(host):
                _progress(s, job, f"host {host.hostname} runs {rec['op']}", now, claimed_by=_worker(host))
            job.lease_expires_at = now + LEASE_TTL
        elif rec.get("state") == "failed":
            _failed(s, job, x, host, str(rec.get("error") or "no reason given")[:1500], now)
        elif rec.get("state") == "succeeded":
            _succeeded(s, job, x, host, rec, now)


def _progress(s: Session, job: m.Job, message: str, now, **values) -> None:
    job.state, job.message, job.started_at = "running", message, job.started_at or now
    for k, v in values.items():
        setattr(job, k, v)
    jobs.log(s, job.id, message)


def _end(s: Session, job: m.Job, state: str, message: str, now) -> None:
    job.state, job.message, job.finished_at, job.lease_expires_at = state, message, now, None
    if state == "succeeded":
        job.progress = 100
    jobs.log(s, job.id, message)


def _failed(s: Session, job: m.Job, x: m.Machine, host: m.Host, why: str, now) -> None:
    """A failover that did not happen gives the machine back to its primary with the new epoch (epochs only
    rise; the replica may have raised its own)."""
    if job.kind == "failover" and job.params.get("kind") != "test" and x.primary_host is not None:
        x.owner_site_id = x.primary_host.site_id
        bump_revision(s, [x.primary_host_id, x.replica_host_id])
        why += f"; machine {x.name} stays with {x.primary_host.hostname} at epoch {x.fencing_epoch}"
    elif job.kind in STEPS:
        why += _stopped_at(s, job, x)
    _end(s, job, "failed", f"host {host.hostname}: {job.params['op']} failed: {why}", now)


def _stopped_at(s: Session, job: m.Job, x: m.Machine) -> str:
    """What a failed reverse or failback leaves: before any host changed, nothing; else the hosts are half-way
    and an operator finishes on them (docs/operations.md, "Reverse replication and failback")."""
    index = job.params.get("step", 0)
    if job.kind == "failback" and index == 0 and x.replica_host is not None:
        x.owner_site_id = x.replica_host.site_id
        bump_revision(s, [x.primary_host_id, x.replica_host_id])
        return (f"; machine {x.name} stays with {x.replica_host.hostname} (reverse replication goes on) at epoch "
                f"{x.fencing_epoch}")
    if index == 0:
        return f"; nothing changed: {x.name} stays failed over, committed"
    done = ", ".join(op for _, op in STEPS[job.kind][:index])
    return (f"; the hosts ran {done} already: finish the remaining steps on them "
            f"({', '.join(op for _, op in STEPS[job.kind][index:])}, docs/operations.md) or ask {job.kind} again")


def _next_step(s: Session, job: m.Job, x: m.Machine, host: m.Host, now) -> bool:
    """Move a reverse or failback job to its next host step (False after its last)."""
    index = job.params.get("step", 0) + 1
    if index >= len(STEPS[job.kind]):
        return False
    nxt, params = _step_params(x, job.kind, index)
    kept = {k: v for k, v in job.params.items() if k in ("epoch_from", "epoch_to")}
    job.params = {**kept, **params}
    job.host_id = nxt.id
    job.claimed_by, job.lease_expires_at = None, None
    job.progress = int(100 * index / len(STEPS[job.kind]))
    _progress(s, job, f"host {host.hostname}: {STEPS[job.kind][index - 1][1]} done; host {nxt.hostname} runs "
                      f"{params['op']}", now)
    bump_revision(s, [x.primary_host_id, x.replica_host_id])
    return True


def _succeeded(s: Session, job: m.Job, x: m.Machine, host: m.Host, rec: dict, now) -> None:
    op = job.params["op"]
    epoch = rec.get("epoch")
    if isinstance(epoch, int) and not isinstance(epoch, bool) and epoch > x.fencing_epoch:
        x.fencing_epoch = epoch                          # a site's disks hold a higher epoch: it wins
    if job.kind in STEPS:
        if _next_step(s, job, x, host, now):
            return
        if job.kind == "reverse":
            message = (f"{x.name} runs on {x.replica_host.hostname} and replicates back to "
                       f"{x.primary_host.hostname} at epoch {x.fencing_epoch}: fail back when ready")
        else:
            message = (f"{x.name} runs on {x.primary_host.hostname} again and replicates to "
                       f"{x.replica_host.hostname} at epoch {x.fencing_epoch}")
        bump_revision(s, [x.primary_host_id, x.replica_host_id])
        _end(s, job, "succeeded", message, now)
        return
    if op == "planned-failover":           # the primary's final cycle is on the replica: the replica side next
        job.params = {**job.params, "op": "failover", "planned": True}
        job.host_id = x.replica_host_id
        job.claimed_by, job.lease_expires_at, job.progress = None, None, 50
        _progress(s, job, f"host {host.hostname}: primary stopped, final cycle replicated; host "
                          f"{x.replica_host.hostname} fails over", now)
        bump_revision(s, [x.primary_host_id, x.replica_host_id])
        return
    if op == "failover" and job.params.get("kind") != "test":
        message = (f"host {host.hostname} runs {x.name} from point {rec.get('point')} at epoch {x.fencing_epoch} "
                   f"(owner: site {x.owner_site.name if x.owner_site else '?'}): commit or cancel the failover")
    elif op == "test-failover":
        message = f"host {host.hostname} runs a test failover of {x.name} at point {rec.get('point')}: clean it up"
    elif op == "cancel-failover":
        x.owner_site_id = x.primary_host.site_id if x.primary_host else x.owner_site_id
        message = (f"failover cancelled on {host.hostname}: {x.name} replicates again from its primary at epoch "
                   f"{x.fencing_epoch}")
    else:
        message = f"host {host.hostname}: {op} done"
    bump_revision(s, [x.primary_host_id, x.replica_host_id])            # roles and epochs as they are now
    _end(s, job, "succeeded", message, now)
