"""Azure as the recovery site of a machine replicatord protects: the primary's operations `azure-failover`
and `failback` (daemon/primary.py runs them as jobs), with the machine's state following docs/states.md:

    Replicating --failover--> RecoveryInProgress --failover_done--> FailedOverWaitingCompletion
      (the machine point's disks are fixed-VHD blobs, the ARM template of [machine.azure_vm] is written)
    --failback_start--> FailbackInProgress
      (minimize-downtime: a pass while the Azure VM runs, repeated at will; `final` after it stopped;
       full: one pass writing every block)
    --failback_done--> FailbackComplete --resync_needed--> WaitingForStartResynchronize --> Replicating

The on-premises disks are written through the machine's own NBD export (its tracker sees the writes; the
export keeps the VHDX open), and replication to Azure resumes with a checksum resync against the replica
blob's digests: only the blocks that differ from what Azure holds are sent, never a full copy."""
from __future__ import annotations

import os
import uuid

from ..errors import UsageError
from ..orchestration.states import Event, ReplicationState, StateError
from ..tracking.nbdclient import NbdClient
from . import failback as fb

S = ReplicationState
OPERATIONS = ("azure-failover", "failback", "azure-test-failover", "azure-cleanup-test-failover")
MODES = ("minimize-downtime", "full")


def azure_target(pm):
    """The AzureTarget under the machine's retry/bandwidth/machine wrappers."""
    t = pm.target
    while hasattr(t, "inner"):
        t = t.inner
    if getattr(t, "name", "") != "azure":
        raise UsageError(f"{pm.name}: replicates to {pm.settings.target}, not to Azure (azure://)")
    return t


def _flag(params: dict, key: str) -> bool:
    return str(params.get(key, "0")).lower() in ("1", "true", "yes")


def operation(pm, op: str, params: dict):
    """The work of `op` (a coroutine function of the job), checked first: a refusal raises before any job."""
    target = azure_target(pm)
    rec = pm.state.data.get("azure_failover")
    point = params.get("point")
    if point is not None and not str(point).isdigit():
        raise UsageError(f"point must be a machine point's number, not {point!r}")
    if op == "azure-test-failover":
        pm.state.start_test_failover(int(point or 0), "azure (being copied)")     # one at a time; its states
        pm.state.data["azure_test_failover"] = {"point": None, "blobs": {}, "template": ""}
        pm.state.save()
        return lambda job: test_failover(pm, target, job, None if point is None else int(point))
    if op == "azure-cleanup-test-failover":
        if pm.state.test_failover is None or "azure_test_failover" not in pm.state.data:
            raise StateError(f"{pm.name}: no test failover to Azure is running")
        return lambda job: cleanup_test_failover(pm, target, job)
    if op == "azure-failover":
        if rec:                                 # its VM may run from those blobs: one failover at a time
            raise StateError(f"{pm.name}: already failed over to Azure at point {rec['point']}: fail back first "
                             f"(`replicator machine {pm.name} failback`)")
        if not pm.state.can(Event.failover):
            raise StateError(f"{pm.name}: failover to Azure is not possible in state {pm.state.state.value}")
        return lambda job: failover(pm, target, job, None if point is None else int(point))
    mode = params.get("mode", "minimize-downtime")
    if mode not in MODES:
        raise UsageError(f"mode must be {' or '.join(MODES)}, not {mode!r}")
    final = _flag(params, "final") or mode == "full"
    if not rec or pm.state.state not in (S.FailedOverWaitingCompletion, S.FailedOver, S.FailbackInProgress):
        raise StateError(f"{pm.name}: failback needs a failover to Azure first (state {pm.state.state.value})")
    started = (rec.get("failback") or {}).get("mode")
    if started and started != mode:
        raise StateError(f"{pm.name}: a {started} failback is under way: go on with --mode {started}")
    return lambda job: failback(pm, target, job, mode, final)


async def failover(pm, target, job, point: int | None) -> None:
    """Every disk of a machine point to a fixed-VHD blob (decrypted), plus the VM's ARM template when the
    machine has [machine.azure_vm]; all or nothing."""
    from .deploy import failover_machine
    from .points import pick
    target.check_keys(await pick(target, pm.name, point))      # refused here: the state does not move
    pm.state.fire(Event.failover, f"failover to Azure: point {point or 'latest'}")
    try:
        job.note("copying the machine point's disks to fixed-VHD blobs")
        fo = await failover_machine(target, pm.name, point, spec=pm.azure_vm)
    except BaseException:
        pm.state.fire(Event.cancel_failover, "failover to Azure failed: replication goes on")
        raise
    blobs, template = _blobs_and_template(pm, fo, f"p{fo.point.point}")
    if template:
        job.note(f"template {template}: az deployment group create -g RG --template-file {template} "
                 "--parameters storageAccountId=ID")
    pm.state.data["azure_failover"] = {"point": fo.point.point, "blobs": blobs, "template": template}
    for name, blob in blobs.items():
        job.note(f"{name}: {blob}")
    pm.state.fire(Event.failover_done, f"failed over to Azure at point {fo.point.point}"
                  + (f": deploy {template}" if template else "")
                  + f"; back with `replicator machine {pm.name} failback`")


async def _kept(target, blob: str, snapshot: str | None) -> str | None:
    """The last pass's snapshot if Azure still has it (a daemon stopped between a pass's end and its record
    leaves one that is gone: the next pass then compares everything)."""
    if not snapshot:
        return None
    snap = target.container.get_blob_client(blob, snapshot=snapshot)
    return snapshot if await target._call(f"look for {blob} at {snapshot}", snap.exists) else None


async def test_failover(pm, target, job, point: int | None) -> None:
    """Test blobs of a machine point (and the template on test_vnet); replication goes on meanwhile."""
    from .deploy import failover_machine
    try:
        fo = await failover_machine(target, pm.name, point, test=True, spec=pm.azure_vm)
    except BaseException:
        del pm.state.data["azure_test_failover"]
        pm.state.stop_test_failover()
        raise
    blobs, template = _blobs_and_template(pm, fo, "test")
    if template:
        job.note(f"template {template} (NICs on the test VNet)")
    pm.state.data["azure_test_failover"] = {"point": fo.point.point, "blobs": blobs, "template": template}
    pm.state.test_failover.update(point=fo.point.point, path=template or ", ".join(blobs.values()))
    pm.state.save()
    for name, blob in blobs.items():
        job.note(f"{name}: {blob}")


async def cleanup_test_failover(pm, target, job) -> None:
    """Delete the test blobs of every disk (and the template): after the test VM was deleted in Azure. Found by
    their metadata, so a test failover a daemon restart interrupted is cleaned up too."""
    from .failover import cleanup
    rec = pm.state.data["azure_test_failover"]
    for d in pm.disks.values():
        for blob in await cleanup(target, d.virtual_disk_id):
            job.note(f"deleted {blob}")
    if rec["template"] and os.path.exists(rec["template"]):
        os.remove(rec["template"])
    del pm.state.data["azure_test_failover"]
    pm.state.stop_test_failover()


class ExportDisk:
    """An on-premises disk written through the machine's NBD export (what failback.sync_pass needs)."""

    def __init__(self, pm, name: str):
        self.tracked, self.path, self.size = pm.disks[name], pm.disks[name].path, pm.disks[name].size
        self.reader = self.tracked.open_reader()
        self.client = NbdClient(pm.export.nbd_socket, name)

    def read(self, offset: int, length: int) -> bytes:
        return self.reader.read(offset, length)

    def write(self, offset: int, data: bytes) -> None:
        self.client.pwrite(offset, data)

    def flush(self) -> None:
        """The export acknowledges a write once its disk holds it."""

    def close(self) -> None:
        self.client.close()
        self.reader.close()


async def failback(pm, target, job, mode: str, final: bool) -> None:
    """One pass per disk (the first, another while the Azure VM runs, or the final one); after the final
    pass the machine replicates to Azure again, starting with a checksum resync."""
    import asyncio
    rec = pm.state.data["azure_failover"]
    state = rec.setdefault("failback", {"mode": mode, "snapshots": {}, "passes": 0})
    if pm.state.state is not S.FailbackInProgress:
        pm.state.fire(Event.failback_start, f"failback from Azure ({mode}): first pass")
    total = sum(pm.disks[n].size for n in rec["blobs"])
    done = written = compared = 0
    job.progress(0, total)
    for name, blob in rec["blobs"].items():
        if name not in pm.disks:
            raise UsageError(f"{pm.name}: disk {name} of the failover is not protected here any more")
        base = await _kept(target, blob, state["snapshots"].get(name))
        disk = await asyncio.to_thread(ExportDisk, pm, name)
        try:
            r = await fb.sync_pass(target, blob, disk, base=base, full=mode == "full",
                                   progress=lambda at, base=done: job.progress(base + at, total))
        finally:
            await asyncio.to_thread(disk.close)
        state["snapshots"][name] = r.snapshot
        pm.state.save()
        done += disk.size
        job.progress(done, total)
        written, compared = written + r.blocks_written, compared + r.blocks_compared
        job.note(f"{name}: {r.blocks_written} of {r.blocks_compared} blocks differed; {r.bytes_read} bytes read "
                 f"from Azure, {r.bytes_written} written here ({r.seconds:.1f} s)")
    state["passes"] += 1
    state["last"] = {"blocks_written": written, "blocks_compared": compared, "final": final}
    if not final:
        pm.state.reason = (f"failback from Azure: pass {state['passes']} done ({written} blocks written); stop the "
                           f"Azure VM, then `replicator machine {pm.name} failback --final`")
        pm.state.save()
        return
    for name, snap in state["snapshots"].items():
        await fb.finish(target, rec["blobs"][name], snap)
    pm.state.data["azure_failback"] = {"point": rec["point"], **state["last"], "passes": state["passes"]}
    del pm.state.data["azure_failover"]
    pm.state.fire(Event.failback_done, f"failback from Azure complete after {state['passes']} pass(es)")

    def mark():
        for d in pm.disks.values():
            d._require_resync("failback from Azure: a checksum resync against the replica blob sends only the "
                              "blocks that differ")
    await asyncio.to_thread(mark)
    pm.state.fire(Event.resync_needed, "failback from Azure: replication to Azure resumes from here")
    job.note("replication to Azure resumes: checksum resynchronization against the replica blobs")
    await pm.run_cycle(forced="resync")


def _blobs_and_template(pm, fo, suffix: str) -> tuple[dict, str]:
    """{disk file name: blob} of a failover, and its ARM template written as STATE_DIR/azure/NAME-SUFFIX.json
    when the machine has a VM spec ("" without one)."""
    from .deploy import arm_template, write_template
    names = {str(uuid.UUID(str(d.virtual_disk_id))): n for n, d in pm.disks.items()}
    blobs = {names.get(str(uuid.UUID(disk_id)), disk_id): r.blob for disk_id, r in fo.disks.items()}
    if pm.azure_vm is None:
        return blobs, ""
    template = os.path.join(pm.state_dir, "azure", f"{pm.name}-{suffix}.json")
    os.makedirs(os.path.dirname(template), exist_ok=True)
    write_template(template, arm_template(fo, pm.azure_vm))
    return blobs, template
