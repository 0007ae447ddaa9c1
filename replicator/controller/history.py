"""What the controller remembers over time about each machine (issue 15): RPO samples for the portal's chart and
the replica host's latest recovery points. The rows live beside models.py's (same Base, same migrations).

Samples are bounded twice, so a fleet reporting every few seconds cannot grow the database without end: at most
one sample per machine every SAMPLE_EVERY seconds (reports in between are dropped; the machine row keeps the
newest value anyway) -- sooner, but never within CHANGE_GAP, when the machine's state or health changed or its
RPO became known, so that a transition is on the chart when it happens -- and samples older than RETENTION are
pruned by the same report that writes a new one.
"""
from __future__ import annotations

import datetime as dt

from sqlalchemy import JSON, BigInteger, Float, ForeignKey, Index, String, delete, func, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from .models import Base, utcnow

SAMPLE_EVERY = dt.timedelta(seconds=60)
CHANGE_GAP = dt.timedelta(seconds=10)
RETENTION = dt.timedelta(days=7)
MAX_POINTS = 64          # recovery points kept per machine (the newest); a policy keeps 24 + 1 by default


class RpoSample(Base):
    """One observation of a machine's replication, from its primary host's report."""

    __tablename__ = "rpo_samples"
    __table_args__ = (Index("ix_rpo_samples_machine_at", "machine_id", "at"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    machine_id: Mapped[int] = mapped_column(ForeignKey("machines.id", ondelete="CASCADE"))
    at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    rpo_seconds: Mapped[float | None] = mapped_column(Float)
    last_success_at: Mapped[dt.datetime | None]
    pending_bytes: Mapped[int | None] = mapped_column(BigInteger)
    cycle_bytes: Mapped[int | None] = mapped_column(BigInteger)
    cycle_seconds: Mapped[float | None] = mapped_column(Float)
    health: Mapped[str | None] = mapped_column(String(32))
    state: Mapped[str | None] = mapped_column(String(64))


class MachinePoints(Base):
    """The recovery points the replica host last reported for a machine (replaced at each report)."""

    __tablename__ = "machine_points"
    machine_id: Mapped[int] = mapped_column(ForeignKey("machines.id", ondelete="CASCADE"), primary_key=True)
    host_id: Mapped[str | None] = mapped_column(ForeignKey("hosts.id", ondelete="SET NULL"))
    reported_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    points: Mapped[list] = mapped_column(JSON, default=list)


# ---------------------------------------------------------------------------------------------- which host says
def reversed_ids(s: Session, machines: list) -> set[int]:
    """The ids of these machines whose direction is "reversed" (failover.direction): their recovery host
    protects them back to their primary host, so it is the one whose report tells their state, RPO and
    history, and their primary host holds their recovery points. Only a machine with a succeeded reverse job
    can be reversed, so one query keeps the common case (none) cheap."""
    from . import failover
    from .models import Job
    ids = [x.id for x in machines]
    if not ids:
        return set()
    maybe = set(s.scalars(select(Job.machine_id).where(Job.machine_id.in_(ids), Job.kind == "reverse",
                                                       Job.state == "succeeded").distinct()))
    return {x.id for x in machines if x.id in maybe and failover.direction(s, x) == "reversed"}


def protecting_host_id(machine, reversed_: set[int]) -> str | None:
    """The host that protects the machine now (its primary host, its replica host while reversed)."""
    return machine.replica_host_id if machine.id in reversed_ else machine.primary_host_id


def replica_side_host_id(machine, reversed_: set[int]) -> str | None:
    """The host that holds the machine's replica now (its replica host, its primary host while reversed)."""
    return machine.primary_host_id if machine.id in reversed_ else machine.replica_host_id


# ---------------------------------------------------------------------------------------------- writing
def _number(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v else None


def success_time(stats: dict) -> dt.datetime | None:
    """A status entry's stats.last_replication_time (seconds since the epoch) as a UTC time, if it is one."""
    last = stats.get("last_replication_time")
    if isinstance(last, (int, float)) and not isinstance(last, bool) and 0 < last < 1e11:
        return dt.datetime.fromtimestamp(last, dt.timezone.utc)
    return None


def _count(v) -> int | None:
    n = _number(v)
    return int(n) if n is not None and 0 <= n < 2 ** 63 else None


def sample_of(machine, entry: dict, now: dt.datetime) -> RpoSample:
    """A sample from a machine's entry in its primary's status document (after _observe set the machine's own
    columns from it): the cycle's bytes and duration when the entry's last_cycle has them."""
    stats = entry.get("stats") if isinstance(entry.get("stats"), dict) else {}
    last = entry.get("last_cycle") if isinstance(entry.get("last_cycle"), dict) else {}
    seconds = _number(last.get("seconds"))
    return RpoSample(machine_id=machine.id, at=now, rpo_seconds=machine.rpo_seconds,
                     last_success_at=machine.last_success_at, pending_bytes=_count(stats.get("pending_size")),
                     cycle_bytes=_count(last.get("bytes_sent")),
                     cycle_seconds=seconds if seconds is not None and seconds >= 0 else None,
                     health=machine.health, state=machine.observed_state)


def _due(last: RpoSample | None, machine, now: dt.datetime) -> bool:
    if last is None:
        return True
    age = now - last.at
    changed = (last.state, last.health, last.rpo_seconds is None) != \
        (machine.observed_state, machine.health, machine.rpo_seconds is None)
    return age >= SAMPLE_EVERY or (changed and age >= CHANGE_GAP)


def record(s: Session, entries: list[tuple], now: dt.datetime) -> int:
    """Add a sample for each (machine, status entry) that is due (see the module's docstring), and prune those
    machines' samples older than RETENTION. Returns how many samples were written."""
    if not entries:
        return 0
    ids = [x.id for x, _ in entries]
    newest = (select(RpoSample.machine_id, func.max(RpoSample.at).label("at"))
              .where(RpoSample.machine_id.in_(ids)).group_by(RpoSample.machine_id).subquery())
    last = {r.machine_id: r for r in s.scalars(select(RpoSample).join(
        newest, (RpoSample.machine_id == newest.c.machine_id) & (RpoSample.at == newest.c.at)))}
    due = [(x, e) for x, e in entries if _due(last.get(x.id), x, now)]
    if not due:
        return 0
    s.add_all([sample_of(x, e, now) for x, e in due])
    s.execute(delete(RpoSample).where(RpoSample.machine_id.in_([x.id for x, _ in due]),
                                      RpoSample.at < now - RETENTION).execution_options(synchronize_session=False))
    return len(due)


def point_of(p: dict) -> dict:
    """A recovery point as the controller keeps it: its number, time (ISO UTC), consistency, generations."""
    return {"point": p["point"], "time": dt.datetime.fromtimestamp(p["time"], dt.timezone.utc).isoformat(),
            "consistency": p["consistency"], "generations": dict(p.get("generations") or {})}


def store_points(s: Session, host, machines: list, reported: dict[str, list[dict]], now: dt.datetime) -> None:
    """The replica host's points replace what it said before, for the machines placed on it as their replica;
    a machine it no longer reports has none there (an empty list, so the page says so)."""
    rows = {r.machine_id: r for r in s.scalars(select(MachinePoints).where(
        MachinePoints.machine_id.in_([x.id for x in machines])))}
    for x in machines:
        points = [point_of(p) for p in reported.get(x.name, [])][-MAX_POINTS:]
        row = rows.get(x.id)
        if row is None:
            s.add(MachinePoints(machine_id=x.id, host_id=host.id, reported_at=now, points=points))
        else:
            row.host_id, row.reported_at, row.points = host.id, now, points
