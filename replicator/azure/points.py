"""Machine recovery points on Azure: after a machine's cycle, each of its disks' blobs is snapshotted with
the machine point's id, so the snapshots of all its blobs together are one point in time of the machine.
Everything is in blob and snapshot metadata (`rpl_machine` on the blob; `rpl_point`, `rpl_cut`,
`rpl_consistency` on the snapshot), so any host with access to the container lists and exports the same
points. Retention is the local replica's rule (replica/retention.py) applied to the machine's complete
points by their cut time; expired snapshots are deleted. A page blob holds at most 100 snapshots, so a
policy that could keep more is refused in one line.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from ..errors import SequenceError, UsageError
from ..replica.retention import keep_points, snapshots_needed
from .errors import classify
from .meta import BlobState, Point, fields, point_from, point_metadata

SNAPSHOTS_PER_BLOB = 100          # the page-blob limit
IN_FLIGHT = 2                     # points of a cycle whose checkpoint has not reached every disk yet


@dataclass(frozen=True)
class DiskPart:
    disk_id: str
    name: str
    size: int
    generation: int
    snapshot: str
    key_id: str = ""


@dataclass
class MachinePoint:
    machine: str
    point: int
    time: float                   # the cut, the primary's clock
    consistency: str
    prepared: bool = False
    kind: str = ""                # latest | hourly | app (what retention keeps it as); "" when incomplete
    disks: dict[str, DiskPart] = field(default_factory=dict)
    complete: bool = False


@dataclass
class Machine:
    name: str
    disks: dict[str, BlobState] = field(default_factory=dict)
    points: list[MachinePoint] = field(default_factory=list)     # complete and in-flight, oldest first
    snapshots: dict[str, list[Point]] = field(default_factory=dict)   # every point snapshot, per disk
    expired: list[MachinePoint] = field(default_factory=list)    # incomplete for good, or out of retention


def machine_key(state: BlobState) -> str:
    """The machine a blob belongs to; a disk replicated without one stands alone."""
    return state.machine or f"disk-{state.disk_id}"


async def scan(target, only: str | None = None) -> dict[str, Machine]:
    """Every replica blob under the target's prefix, grouped by machine, with its point snapshots."""
    blobs: dict[str, BlobState] = {}
    snaps: dict[str, list[Point]] = {}
    try:
        async for item in target.container.list_blobs(name_starts_with=target.prefix,
                                                      include=["snapshots", "metadata"]):
            disk = _disk_of(target, item.name)
            if disk is None:
                continue
            if item.snapshot:
                p = point_from(item.snapshot, item.metadata)
                if p is not None:
                    snaps.setdefault(disk, []).append(p)
            elif "disk_id" in fields(item.metadata):
                blobs[disk] = BlobState.from_metadata(item.metadata, item.name)
    except Exception as e:         # noqa: BLE001 - classified
        raise classify(e, f"list the replica blobs of {target.container.container_name}") from None
    out: dict[str, Machine] = {}
    for disk, state in blobs.items():
        key = machine_key(state)
        if only is not None and key != only:
            continue
        m = out.setdefault(key, Machine(key))
        m.disks[disk] = state
        m.snapshots[disk] = sorted(snaps.get(disk, []), key=lambda p: (p.generation, p.snapshot))
    for m in out.values():
        _assemble(m)
    return out


def _disk_of(target, name: str) -> str | None:
    rest = name[len(target.prefix):]
    if not rest.endswith(".vhd"):
        return None
    try:
        return str(uuid.UUID(rest[:-4]))
    except ValueError:
        return None


def _assemble(m: Machine) -> None:
    """Points of the machine: complete where every disk has its snapshot; kinds from the retention rule."""
    by_point: dict[int, MachinePoint] = {}
    for disk, pts in m.snapshots.items():
        state = m.disks[disk]
        for p in pts:
            if p.machine_point is None:
                continue
            mp = by_point.setdefault(p.machine_point, MachinePoint(m.name, p.machine_point, p.time, p.consistency))
            mp.prepared = mp.prepared or p.stream == "prepared"     # a machine snapshot's stream field
            mp.disks[disk] = DiskPart(disk, state.name, state.disk_size, p.generation, p.snapshot, p.key_id)
    points = sorted(by_point.values(), key=lambda mp: mp.point)
    for mp in points:
        mp.complete = set(mp.disks) == set(m.disks)
    complete = [mp for mp in points if mp.complete]
    additional = max((s.additional for s in m.disks.values()), default=0)
    for i, why in keep_points([(mp.time, mp.consistency) for mp in complete], additional).items():
        complete[i].kind = why
    newest = complete[-1].point if complete else -1
    m.points = [mp for mp in points if mp.kind or (not mp.complete and mp.point > newest)]
    m.expired = [mp for mp in points if mp not in m.points]


async def machine_points(target, machine: str | None = None) -> dict[str, list[MachinePoint]]:
    """The complete, retained points of each machine (or of one), oldest first."""
    found = await scan(target, machine)
    if machine is not None and machine not in found:
        raise UsageError(f"no machine {machine!r} in {target.container.container_name}/{target.prefix} (have "
                         f"{sorted(found) or 'none'})")
    return {name: [mp for mp in m.points if mp.complete] for name, m in found.items()}


async def pick(target, machine: str, point: int | None) -> MachinePoint:
    pts = (await machine_points(target, machine))[machine]
    if not pts:
        raise UsageError(f"machine {machine!r} has no complete recovery point yet")
    if point is None:
        return pts[-1]
    for mp in pts:
        if mp.point == point:
            return mp
    raise UsageError(f"machine {machine!r} has no recovery point {point} (have {[mp.point for mp in pts]})")


def budget_problem(retention, additional: int) -> str | None:
    """Why a policy's points cannot fit in a page blob's 100 snapshots (None: they fit). `retention`: the
    azure:// URL's retention= (plain cycle points); settings validation and the target both ask."""
    try:
        retention = max(1, int(retention))
    except (TypeError, ValueError):
        return None                       # the URL's own parser reports it
    need = snapshots_needed(additional, retention + IN_FLIGHT)
    if need <= SNAPSHOTS_PER_BLOB:
        return None
    return (f"additional_points={additional} with retention={retention} may keep {need} snapshots of a page "
            f"blob; Azure allows {SNAPSHOTS_PER_BLOB}: lower retention= in the azure:// URL or additional_points")


def check_budget(target, additional: int) -> None:
    """Refuse a policy whose points cannot fit in a page blob's 100 snapshots."""
    why = budget_problem(target.retention, additional)
    if why:
        raise UsageError(why)


async def checkpoint(target, disk_id, generation: int, point: int, prepared: bool,
                     additional_points: int | None) -> None:
    """This disk's part of machine point `point` (idempotent), then the machine's retention on its
    snapshots. The cut time is the first disk's, so every disk's part of a point has the same time; a
    point only counts (and retention only moves) once every disk has its part, so the checkpoint of the
    cut's last disk deletes the expired snapshots of them all (a snapshot needs no lease to be deleted)."""
    disk = str(uuid.UUID(str(disk_id)))
    lease = await target._lease(disk_id)
    state = await target._read_state(disk_id)
    if generation != state.generation:
        raise SequenceError(f"checkpoint names generation {generation} of disk {disk}, "
                            f"{target._where(disk_id)} holds {state.generation}")
    if additional_points is not None:
        check_budget(target, additional_points)
        if additional_points != state.additional:
            state.additional = additional_points
            await target._save(disk_id, lease, state)
    m = (await scan(target, machine_key(state))).get(machine_key(state))
    mine = [p for p in m.snapshots.get(disk, [])] if m else []
    if not any(p.machine_point == point for p in mine):
        others = [p for pts in (m.snapshots.values() if m else []) for p in pts if p.machine_point == point]
        cut, consistency = ((others[0].time, others[0].consistency) if others
                            else (state.cut_time, state.cut_consistency))
        meta = point_metadata(generation, cut, consistency, "prepared" if prepared else "", "machine",
                              state.key_id, point=str(point))
        await target._call(f"snapshot {target._where(disk_id)} for machine point {point}",
                           target.blob(disk_id).create_snapshot, metadata=meta, lease=lease)
        m = (await scan(target, machine_key(state)))[machine_key(state)]
    gone_points = {mp.point for mp in m.expired} - {point}
    for other, pts in m.snapshots.items():       # the cut's last disk expires the points of every disk
        await target.delete_points(other, [p for p in pts if p.machine_point in gone_points])
    await target.prune(disk_id)
