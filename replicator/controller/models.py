"""The controller's store: one SQLAlchemy schema for SQLite and PostgreSQL (docs/management-plane.md).

Names are the handles users type (`--cloud gold`, `machine enable vm01`), so every named resource has a unique
`name` beside its integer id; hosts are keyed by the id their certificate's CN carries. Rules the database can
hold are constraints (a cloud belongs to one pair only: `clouds.pair_id` is one column; one policy per pair:
`policy_associations.pair_id` is its key), so two controller processes on one PostgreSQL cannot break them.
Schema changes go in new Alembic revisions (replicator/controller/migrations/versions), never by editing these
classes alone.
"""
from __future__ import annotations

import datetime as dt
import uuid

from sqlalchemy import (JSON, BigInteger, Boolean, CheckConstraint, DateTime, Float, ForeignKey, Integer,
                        MetaData, String, Text, TypeDecorator, UniqueConstraint, event)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from ..replication.pacing import COPY_RATE_WHEN_BUSY

NAME_LEN = 64

# Alembic needs stable constraint names to alter tables (SQLite batch mode recreates them by name).
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def new_host_id() -> str:
    return uuid.uuid4().hex


class UTCDateTime(TypeDecorator):
    """Aware UTC datetimes on both databases (SQLite would hand back naive ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to the store: use an aware UTC datetime")
        return value.astimezone(dt.timezone.utc) if value is not None else None

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dt.datetime: UTCDateTime}


def _enum(column: str, values) -> CheckConstraint:
    """A portable enumeration: a CHECK on a string column (no native ENUM type to migrate on PostgreSQL)."""
    quoted = ", ".join(f"'{v}'" for v in values)
    return CheckConstraint(f"{column} IN ({quoted})", name=f"{column}_allowed")


# ---------------------------------------------------------------------------------------------- topology
class Site(Base):
    __tablename__ = "sites"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Host(Base):
    """A registered replicatord (H2's host channel fills the certificate, last_seen and report columns)."""

    __tablename__ = "hosts"
    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=new_host_id)
    hostname: Mapped[str] = mapped_column(String(255), unique=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id", ondelete="RESTRICT"), index=True)
    cloud_id: Mapped[int | None] = mapped_column(ForeignKey("clouds.id", ondelete="SET NULL"), index=True)
    admin_url: Mapped[str | None] = mapped_column(String(512))
    data_url: Mapped[str | None] = mapped_column(String(512))
    cert_serial: Mapped[str | None] = mapped_column(String(64))          # hex
    cert_not_after: Mapped[dt.datetime | None]
    registered_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_seen: Mapped[dt.datetime | None]
    last_report: Mapped[dict | None] = mapped_column(JSON)
    desired_revision: Mapped[int] = mapped_column(Integer, default=1)
    applied_revision: Mapped[int] = mapped_column(Integer, default=0)

    site: Mapped[Site] = relationship()
    cloud: Mapped[Cloud | None] = relationship(back_populates="hosts")


class RegistrationKey(Base):
    """A single-site, expiring, single-use secret a host registers with; only its SHA-256 is kept."""

    __tablename__ = "registration_keys"
    id: Mapped[int] = mapped_column(primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime]
    created_by: Mapped[str] = mapped_column(String(NAME_LEN), default="")
    used_by: Mapped[str | None] = mapped_column(ForeignKey("hosts.id", ondelete="SET NULL"))
    used_at: Mapped[dt.datetime | None]

    site: Mapped[Site] = relationship()


class Cloud(Base):
    """A group of hosts on one site; `pair_id`/`pair_role` put it in at most one pair (one column, one pair)."""

    __tablename__ = "clouds"
    __table_args__ = (UniqueConstraint("pair_id", "pair_role"), _enum("pair_role", ("primary", "recovery")))
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN), unique=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id", ondelete="RESTRICT"), index=True)
    description: Mapped[str] = mapped_column(Text, default="")
    pair_id: Mapped[int | None] = mapped_column(ForeignKey("cloud_pairs.id", ondelete="SET NULL"), index=True)
    pair_role: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    site: Mapped[Site] = relationship()
    pair: Mapped[CloudPair | None] = relationship(back_populates="clouds")
    hosts: Mapped[list[Host]] = relationship(back_populates="cloud")


class CloudPair(Base):
    """Primary cloud -> recovery cloud (the clouds point at the pair)."""

    __tablename__ = "cloud_pairs"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    clouds: Mapped[list[Cloud]] = relationship(back_populates="pair")
    association: Mapped[PolicyAssociation | None] = relationship(back_populates="pair", cascade="all, delete-orphan")
    network_mappings: Mapped[list[NetworkMapping]] = relationship(cascade="all, delete-orphan")
    storage_mappings: Mapped[list[StorageMapping]] = relationship(cascade="all, delete-orphan")
    extended: Mapped[ExtendedPair | None] = relationship(back_populates="pair", cascade="all, delete-orphan")

    def cloud(self, role: str) -> Cloud | None:
        return next((c for c in self.clouds if c.pair_role == role), None)


# ---------------------------------------------------------------------------------------------- protection
TARGET_KINDS = ("peer", "azure")
AUTH_MODES = ("certificate", "kerberos")
INITIAL_METHODS = ("network", "scheduled", "offline", "existing")
RESYNC_MODES = ("auto", "manual")


class ProtectionPolicy(Base):
    """Every setting of an ASR replication policy; the values follow replicatord.toml's (settings.py)."""

    __tablename__ = "protection_policies"
    __table_args__ = (_enum("target_kind", TARGET_KINDS), _enum("auth", AUTH_MODES),
                      _enum("initial_method", INITIAL_METHODS), _enum("resync", RESYNC_MODES))
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN), unique=True)
    target_kind: Mapped[str] = mapped_column(String(16), default="peer")
    frequency: Mapped[int] = mapped_column(Integer, default=300)                 # seconds: 30, 300, 900
    additional_points: Mapped[int] = mapped_column(Integer, default=0)           # 0-24 hourly points
    app_consistent_hours: Mapped[int] = mapped_column(Integer, default=0)        # 0: crash-consistent only
    compression: Mapped[bool] = mapped_column(Boolean, default=True)
    auth: Mapped[str] = mapped_column(String(16), default="certificate")
    port: Mapped[int | None] = mapped_column(Integer)
    initial_method: Mapped[str] = mapped_column(String(16), default="network")
    initial_at: Mapped[str | None] = mapped_column(String(64))                  # ISO date-time or time of day
    initial_seed_dir: Mapped[str | None] = mapped_column(String(1024))
    initial_path: Mapped[str | None] = mapped_column(String(1024))
    delete_replica_on_remove: Mapped[bool] = mapped_column(Boolean, default=False)
    bandwidth_limit: Mapped[int | None] = mapped_column(BigInteger)              # bytes/s; None = unlimited
    resync: Mapped[str] = mapped_column(String(16), default="auto")
    resync_window: Mapped[str | None] = mapped_column(String(16))               # "HH:MM-HH:MM"
    azure_storage_account: Mapped[str | None] = mapped_column(String(64))
    azure_container: Mapped[str | None] = mapped_column(String(64))
    azure_encrypt: Mapped[bool] = mapped_column(Boolean, default=False)
    rpo_threshold: Mapped[int] = mapped_column(Integer, default=3600, server_default="3600")   # seconds: Warning
    # bytes/s of a copy read while the guest writes (replication.pacing); 0: full speed (None would mean
    # "unset" to the ORM, which then writes the default)
    copy_rate_when_busy: Mapped[int] = mapped_column(BigInteger, default=COPY_RATE_WHEN_BUSY,
                                                     server_default=str(COPY_RATE_WHEN_BUSY))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class PolicyAssociation(Base):
    """The policy a cloud pair applies to its machines (one per pair, a policy may serve many pairs)."""

    __tablename__ = "policy_associations"
    pair_id: Mapped[int] = mapped_column(ForeignKey("cloud_pairs.id", ondelete="CASCADE"), primary_key=True)
    policy_id: Mapped[int] = mapped_column(ForeignKey("protection_policies.id", ondelete="RESTRICT"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    pair: Mapped[CloudPair] = relationship(back_populates="association")
    policy: Mapped[ProtectionPolicy] = relationship()


EXTENDED_FREQUENCIES = (300, 900)          # Hyper-V's choices for the extended leg (orchestration/extended.py)


class ExtendedPair(Base):
    """A pair's extended leg (Hyper-V's extended replication): the recovery cloud's hosts forward each machine
    on to a host of a third cloud, with the leg's own policy. One per pair (`pair_id` is unique); the third
    cloud is in no pair and serves one extended leg (`cloud_id` unique). Each machine's extended replica is
    placed on a host of that cloud (ExtendedPlacement), kept once chosen."""

    __tablename__ = "extended_pairs"
    __table_args__ = (_enum("auth", AUTH_MODES), CheckConstraint("frequency IN (300, 900)", name="frequency_allowed"))
    id: Mapped[int] = mapped_column(primary_key=True)
    pair_id: Mapped[int] = mapped_column(ForeignKey("cloud_pairs.id", ondelete="CASCADE"), unique=True)
    cloud_id: Mapped[int] = mapped_column(ForeignKey("clouds.id", ondelete="RESTRICT"), unique=True)
    frequency: Mapped[int] = mapped_column(Integer, default=300)                 # seconds: 300 or 900
    additional_points: Mapped[int] = mapped_column(Integer, default=0)           # the third site's own points
    compression: Mapped[bool] = mapped_column(Boolean, default=True)
    bandwidth_limit: Mapped[int | None] = mapped_column(BigInteger)              # bytes/s; None = unlimited
    auth: Mapped[str] = mapped_column(String(16), default="certificate")
    storage: Mapped[str | None] = mapped_column(String(1024))                    # root on the third site's hosts
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    pair: Mapped[CloudPair] = relationship(back_populates="extended")
    cloud: Mapped[Cloud] = relationship()


class NetworkMapping(Base):
    __tablename__ = "network_mappings"
    __table_args__ = (UniqueConstraint("pair_id", "source_network"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    pair_id: Mapped[int] = mapped_column(ForeignKey("cloud_pairs.id", ondelete="CASCADE"), index=True)
    source_network: Mapped[str] = mapped_column(String(255))
    target_network: Mapped[str] = mapped_column(String(255))


class StorageMapping(Base):
    __tablename__ = "storage_mappings"
    __table_args__ = (UniqueConstraint("pair_id", "source_root"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    pair_id: Mapped[int] = mapped_column(ForeignKey("cloud_pairs.id", ondelete="CASCADE"), index=True)
    source_root: Mapped[str] = mapped_column(String(1024))
    target_root: Mapped[str] = mapped_column(String(1024))


DESIRED_STATES = ("enabled", "paused", "disabled")


class Machine(Base):
    """A protected machine: where it runs and replicates (desired), what its hosts last said (observed), and
    which site owns it under which fencing epoch (raised at every failover; H3's fencing reads these)."""

    __tablename__ = "machines"
    __table_args__ = (_enum("desired_state", DESIRED_STATES),)
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN), unique=True)
    cloud_id: Mapped[int] = mapped_column(ForeignKey("clouds.id", ondelete="RESTRICT"), index=True)
    primary_host_id: Mapped[str | None] = mapped_column(ForeignKey("hosts.id", ondelete="SET NULL"), index=True)
    replica_host_id: Mapped[str | None] = mapped_column(ForeignKey("hosts.id", ondelete="SET NULL"), index=True)
    domain: Mapped[str | None] = mapped_column(String(255))                    # libvirt domain, or disks below
    disks: Mapped[list] = mapped_column(JSON, default=list)
    excluded: Mapped[list] = mapped_column(JSON, default=list)
    policy_id: Mapped[int | None] = mapped_column(ForeignKey("protection_policies.id", ondelete="RESTRICT"))
    desired_state: Mapped[str] = mapped_column(String(16), default="enabled")
    resync_requested: Mapped[int] = mapped_column(Integer, default=0)           # raised by each resync asked
    observed_state: Mapped[str | None] = mapped_column(String(64))
    health: Mapped[str | None] = mapped_column(String(32))                      # Normal / Warning / Critical
    rpo_seconds: Mapped[float | None] = mapped_column(Float)
    last_success_at: Mapped[dt.datetime | None]
    observed_at: Mapped[dt.datetime | None]
    owner_site_id: Mapped[int | None] = mapped_column(ForeignKey("sites.id", ondelete="RESTRICT"))
    fencing_epoch: Mapped[int] = mapped_column(Integer, default=1)
    owner_lease_expires: Mapped[dt.datetime | None]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    cloud: Mapped[Cloud] = relationship()
    primary_host: Mapped[Host | None] = relationship(foreign_keys=[primary_host_id])
    replica_host: Mapped[Host | None] = relationship(foreign_keys=[replica_host_id])
    extended: Mapped[ExtendedPlacement | None] = relationship(cascade="all, delete-orphan")

    @property
    def extended_host(self) -> Host | None:
        return self.extended.host if self.extended is not None else None
    policy: Mapped[ProtectionPolicy | None] = relationship()
    owner_site: Mapped[Site | None] = relationship()


class ExtendedPlacement(Base):
    """The host of its pair's third cloud that holds a machine's extended replica: chosen once (the least
    loaded host when the leg or the machine is made, or when a first host joins that cloud) and kept, as the
    extended site's disks are there. A table of its own, so adding it altered no existing table."""

    __tablename__ = "extended_placements"
    machine_id: Mapped[int] = mapped_column(ForeignKey("machines.id", ondelete="CASCADE"), primary_key=True)
    host_id: Mapped[str] = mapped_column(ForeignKey("hosts.id", ondelete="CASCADE"), index=True)
    placed_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    host: Mapped[Host] = relationship()


# ---------------------------------------------------------------------------------------------- jobs and plans
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled", "waiting_for_input")
JOB_DONE = ("succeeded", "failed", "cancelled")


class Job(Base):
    """A long operation. Claimed by one worker at a time (a controller process or a host) under a lease:
    `claimed_by` + `lease_expires_at`, taken only by a conditional UPDATE (jobs.py)."""

    __tablename__ = "jobs"
    __table_args__ = (_enum("state", JOB_STATES),)
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    state: Mapped[str] = mapped_column(String(24), default="queued", index=True)
    machine_id: Mapped[int | None] = mapped_column(ForeignKey("machines.id", ondelete="SET NULL"), index=True)
    plan_run_id: Mapped[int | None] = mapped_column(ForeignKey("plan_runs.id", ondelete="SET NULL"), index=True)
    host_id: Mapped[str | None] = mapped_column(ForeignKey("hosts.id", ondelete="SET NULL"), index=True)
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    progress: Mapped[int] = mapped_column(Integer, default=0)                     # percent
    message: Mapped[str] = mapped_column(Text, default="")
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[dt.datetime | None]
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_by: Mapped[str] = mapped_column(String(NAME_LEN), default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    started_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]

    machine: Mapped[Machine | None] = relationship()
    log: Mapped[list[JobLogLine]] = relationship(order_by="JobLogLine.id", cascade="all, delete-orphan")


class JobLogLine(Base):
    __tablename__ = "job_log"
    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    line: Mapped[str] = mapped_column(Text)


FAILOVER_KINDS = ("test", "planned", "unplanned")


class RecoveryPlan(Base):
    __tablename__ = "recovery_plans"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN), unique=True)
    pair_id: Mapped[int] = mapped_column(ForeignKey("cloud_pairs.id", ondelete="RESTRICT"), index=True)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    pair: Mapped[CloudPair] = relationship()
    groups: Mapped[list[PlanGroup]] = relationship(order_by="PlanGroup.position", cascade="all, delete-orphan")


class PlanGroup(Base):
    __tablename__ = "plan_groups"
    __table_args__ = (UniqueConstraint("plan_id", "position"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    plan_id: Mapped[int] = mapped_column(ForeignKey("recovery_plans.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)                               # 1..7, failed over in order

    members: Mapped[list[PlanMember]] = relationship(cascade="all, delete-orphan")
    actions: Mapped[list[PlanAction]] = relationship(order_by="PlanAction.position", cascade="all, delete-orphan")


class PlanMember(Base):
    """A machine in a plan's group; a machine is in one group of a plan (plan_id, machine_id unique)."""

    __tablename__ = "plan_members"
    __table_args__ = (UniqueConstraint("plan_id", "machine_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    plan_id: Mapped[int] = mapped_column(ForeignKey("recovery_plans.id", ondelete="CASCADE"))
    group_id: Mapped[int] = mapped_column(ForeignKey("plan_groups.id", ondelete="CASCADE"), index=True)
    machine_id: Mapped[int] = mapped_column(ForeignKey("machines.id", ondelete="RESTRICT"), index=True)

    machine: Mapped[Machine] = relationship()


class PlanAction(Base):
    """A group's pre- or post-action: a script (argv, run where the plan runs) or a manual step confirmed
    through the API."""

    __tablename__ = "plan_actions"
    __table_args__ = (_enum("phase", ("pre", "post")), _enum("action_kind", ("script", "manual")))
    id: Mapped[int] = mapped_column(primary_key=True)
    group_id: Mapped[int] = mapped_column(ForeignKey("plan_groups.id", ondelete="CASCADE"), index=True)
    phase: Mapped[str] = mapped_column(String(8))
    position: Mapped[int] = mapped_column(Integer)
    action_kind: Mapped[str] = mapped_column(String(8))
    script: Mapped[list | None] = mapped_column(JSON)                             # argv
    manual: Mapped[str | None] = mapped_column(Text)
    timeout: Mapped[float | None] = mapped_column(Float)
    kinds: Mapped[list | None] = mapped_column(JSON)                              # failover kinds; None = all


PLAN_RUN_STATES = ("queued", "running", "waiting_for_input", "succeeded", "failed", "cancelled")


class PlanRun(Base):
    __tablename__ = "plan_runs"
    __table_args__ = (_enum("kind", FAILOVER_KINDS), _enum("state", PLAN_RUN_STATES))
    id: Mapped[int] = mapped_column(primary_key=True)
    plan_id: Mapped[int] = mapped_column(ForeignKey("recovery_plans.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(24), default="queued")
    current_group: Mapped[int] = mapped_column(Integer, default=0)               # 0: not started
    waiting_action_id: Mapped[int | None] = mapped_column(ForeignKey("plan_actions.id", ondelete="SET NULL"))
    confirmations: Mapped[list] = mapped_column(JSON, default=list)               # [{action_id, by, at, note}]
    forced: Mapped[bool] = mapped_column(Boolean, default=False)
    created_by: Mapped[str] = mapped_column(String(NAME_LEN), default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[dt.datetime | None]

    plan: Mapped[RecoveryPlan] = relationship()


# ---------------------------------------------------------------------------------------------- access
ROLES = ("read-only", "operator", "admin")


class ApiToken(Base):
    """A bearer token for the REST API; only its SHA-256 is kept."""

    __tablename__ = "api_tokens"
    __table_args__ = (_enum("role", ROLES),)
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    created_by: Mapped[str] = mapped_column(String(NAME_LEN), default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[dt.datetime | None]
    revoked_at: Mapped[dt.datetime | None]


class AuditEntry(Base):
    """Append-only: who (token name or host id), what (action), when, on what (target), and the outcome."""

    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(255), default="")
    outcome: Mapped[str] = mapped_column(String(255), default="ok")
    detail: Mapped[dict] = mapped_column(JSON, default=dict)


@event.listens_for(AuditEntry, "before_update")
@event.listens_for(AuditEntry, "before_delete")
def _append_only(mapper, connection, target):
    """The audit log is append-only: an entry is never changed or removed through the ORM."""
    raise PermissionError(f"audit entry {target.id} is append-only")
