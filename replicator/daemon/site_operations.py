"""Failover steps the controller asks of this host (controller/failover.py), run by the agent as an operator
would through the admin API: `planned-failover` on the primary (the machine's own job: guest stopped, final
cycle), and on the replica site `failover` {planned, point}, `test-failover` {point}, `cleanup-test-failover`,
`commit-failover`, `cancel-failover` (replica_site.py). Reverse replication and failback (daemon/reverse.py):
`accept-reverse` {args: from, force} on the original primary (its old disks become the replica of the way
back; a machine this site holds as a replica already has accepted: a retried reverse goes on) and `reverse`
{args: settings} on the site running the machine (the controller's settings, with this host's certificate
files from the agent, STATE/controller/; none for a configured machine, which keeps its own).

Each step names its controller job; it runs at most once per (job, op): the record
`{"job", "op", "state": "running"}` is written to operations.json before it starts, and a step found
"running" there when the agent starts again was cut short by a restart (reported failed, not run twice)."""
from __future__ import annotations

import asyncio
import logging
import os

from ..errors import ReplicatorError
from ..orchestration.states import StateError

log = logging.getLogger("replicatord.agent")
POINT_WAIT = 15                   # seconds a failover waits for a recovery point that holds all the disks
REPLICA_OPS = ("failover", "test-failover", "cleanup-test-failover", "commit-failover", "cancel-failover")
AGENT_FILES = {"cert": "host.pem", "key": "host.key", "ca": "ca.pem"}


def interrupted(done: dict) -> None:
    """At the agent's start: steps left running by the previous process are failed, never run again."""
    for rec in done.values():
        site = rec.get("site") if isinstance(rec, dict) else None
        if isinstance(site, dict) and site.get("state") == "running":
            site.update(state="failed", error="interrupted: replicatord stopped while it ran")


def pending(wanted: dict, done: dict) -> list[tuple[str, dict]]:
    """(machine, step) of the desired operations not run yet."""
    out = []
    for name, op in sorted(wanted.items()):
        step = op.get("site") if isinstance(op, dict) else None
        if not isinstance(step, dict) or not isinstance(step.get("job"), int) or not isinstance(step.get("op"), str):
            continue
        rec = (done.get(name) or {}).get("site") or {}
        if (rec.get("job"), rec.get("op")) != (step["job"], step["op"]):
            out.append((name, step))
    return out


async def run(daemon, name: str, step: dict) -> dict:
    """Run one step; what the report says of it besides its state (point, epoch, the host job)."""
    op, point = step["op"], step.get("point")
    if point is not None and (not isinstance(point, int) or isinstance(point, bool)):
        raise ReplicatorError(f"point must be a number, not {point!r:.40}")
    if op == "planned-failover":
        pm = daemon.machines.get(name)
        if pm is None:
            raise StateError(f"{name} is not protected on this host")
        job, task = await pm.begin("planned-failover")
        await asyncio.wait({task})                    # its job holds the outcome
        if job.state.value != "succeeded":
            raise ReplicatorError(f"planned failover ({job.id}): {job.error or job.state.value}")
        return {"host_job": job.id}
    if op in ("accept-reverse", "reverse"):
        return await _reverse(daemon, name, op, step.get("args") or {})
    if op not in REPLICA_OPS:
        raise ReplicatorError(f"unknown operation {op!r:.40}")
    site = daemon.site
    if op == "failover":
        view = await _when_a_point_holds(site, name, lambda: site.failover(name, point, bool(step.get("planned"))))
    elif op == "test-failover":
        view = await _when_a_point_holds(site, name, lambda: site.test_failover(name, point))
    else:
        view = await getattr(site, op.replace("-", "_"))(name)
    epochs = [d.get("epoch") for d in view.get("disks") or [] if isinstance(d.get("epoch"), int)]
    out: dict = {"epoch": max(epochs)} if epochs else {}
    fo = view.get("failover") if op == "failover" else view.get("test_failover") if op == "test-failover" else None
    if isinstance(fo, dict) and fo.get("point") is not None:
        out["point"] = fo["point"]
    return out


async def _when_a_point_holds(site, name: str, start, tries: int = POINT_WAIT):
    """Run a failover; while the machine has no recovery point that holds all its disks -- a cycle of the
    primary in flight between its commit and its checkpoint leaves none when no additional points are kept
    -- try again each second for a while instead of failing at once."""
    for left in range(tries, -1, -1):
        try:
            return await start()
        except StateError:
            if left == 0 or (await site._view_of(name)).get("points"):
                raise
            await asyncio.sleep(1)


async def _reverse(daemon, name: str, op: str, args: dict) -> dict:
    if not isinstance(args, dict):
        raise ReplicatorError(f"{op}: args must be an object, not {args!r:.40}")
    site = daemon.site
    if op == "accept-reverse":
        principal = args.get("from")         # checked by accept_reverse
        if name not in daemon.machines and daemon.replica_server is not None \
                and name in site.machines() and site._role(name) == "replica":
            return {}                         # accepted before (a reverse asked again after its second step failed)
        await site.accept_reverse(name, principal, bool(args.get("force", False)))
        return {}
    settings = args.get("settings") or {}
    if not isinstance(settings, dict):
        raise ReplicatorError(f"reverse: settings must be an object, not {settings!r:.40}")
    if settings:
        folder = os.path.join(daemon.state_dir, "controller")
        settings = {**settings, **{k: os.path.join(folder, f) for k, f in AGENT_FILES.items()}}
    status = await site.reverse(name, settings)
    epoch = status.get("epoch") if isinstance(status, dict) else None
    return {"epoch": epoch} if isinstance(epoch, int) and not isinstance(epoch, bool) else {}
