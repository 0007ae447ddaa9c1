"""What the controller remembers over time about each machine (issue 15): RPO samples for the portal's chart and
the replica host's latest recovery points. The rows live beside models.py's (same Base, same migrations).

Samples are bounded twice, so a fleet reporting every few seconds cannot grow the database without end: at most
one sample per machine every SAMPLE_EVERY seconds (reports in between are dropped; the machine row keeps the
newest value anyway), and samples older than RETENTION are pruned by the same report that writes a new one.
"""
from __future__ import annotations

import datetime as dt

from sqlalchemy import JSON, BigInteger, Float, ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from .models import Base, utcnow

SAMPLE_EVERY = dt.timedelta(seconds=60)
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
