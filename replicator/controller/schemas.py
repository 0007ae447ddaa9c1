"""Request and response bodies of the REST API (pydantic), with replicatord's own validation where the two
overlap: frequencies, bandwidth, windows and the cross-field rules come from orchestration/settings.py, so a
policy the controller accepts is one replicatord.toml would accept.

Every string is bounded by its column and refused when it holds NUL or lone surrogates (PostgreSQL and SQLite
cannot store them): bad input is a 422 with one line, never a 500 from the database.
"""
from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from ..orchestration import settings
from ..orchestration.plans import KINDS as FAILOVER_KINDS
from ..orchestration.plans import MAX_GROUPS, PlanError, PlanGroup, RecoveryPlan
from ..replication.pacing import COPY_RATE_WHEN_BUSY
from . import models as m

NAME_PATTERN = settings._NAME.pattern


def _storable(v: str) -> str:
    if "\x00" in v:
        raise ValueError("must not contain NUL characters")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (no lone surrogates)") from None
    return v


def text(max_length: int, min_length: int = 0):
    return Annotated[str, Field(min_length=min_length, max_length=max_length), AfterValidator(_storable)]


Name = Annotated[str, Field(pattern=NAME_PATTERN, description="letters, digits, '.', '_', '-'; at most 64")]
Description = text(2000)
AbsPath = Annotated[str, Field(min_length=1, max_length=1024, pattern=r"^/[^\x00]*$"), AfterValidator(_storable)]
HostRef = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$",
                               description="a host id or hostname")]
FailoverKind = Literal["test", "planned", "unplanned"]
assert set(FailoverKind.__args__) == set(FAILOVER_KINDS) == set(m.FAILOVER_KINDS)


class In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class Error(BaseModel):
    error: str


# ---------------------------------------------------------------------------------------------- sites, hosts
class SiteIn(In):
    name: Name
    description: Description = ""


class SiteOut(Out):
    id: int
    name: str
    description: str
    created_at: dt.datetime


class HostOut(Out):
    id: str
    hostname: str
    site: str
    cloud: str | None
    admin_url: str | None
    data_url: str | None
    cert_not_after: dt.datetime | None
    registered_at: dt.datetime
    last_seen: dt.datetime | None
    desired_revision: int
    applied_revision: int


class HostCloudIn(In):
    cloud: Name | None = Field(description="the cloud to put the host in (on the host's site), or null")


# ---------------------------------------------------------------------------------------------- clouds, pairs
class CloudIn(In):
    name: Name
    site: Name
    description: Description = ""


class CloudOut(Out):
    id: int
    name: str
    site: str
    description: str
    pair: str | None
    pair_role: Literal["primary", "recovery"] | None
    hosts: list[str]


class PairIn(In):
    name: Name
    primary: Name = Field(description="the primary cloud")
    recovery: Name = Field(description="the recovery cloud")
    policy: Name | None = Field(None, description="the protection policy its machines follow")


class PairPolicyIn(In):
    policy: Name | None


class NetworkMappingIn(In):
    source: text(255, 1)
    target: text(255, 1)


class StorageMappingIn(In):
    source: AbsPath
    target: AbsPath


class MappingOut(Out):
    id: int
    source: str
    target: str


class ExtendedIn(In):
    """A pair's extended leg (Hyper-V's extended replication): the recovery cloud's hosts forward each machine
    on to a host of a third cloud, on another site, with this policy. Frequency and bandwidth take
    replicatord.toml's forms and are checked by its parsers."""

    cloud: Name = Field(description="the third cloud (in no pair, on a site of neither of the pair's clouds)")
    frequency: int | text(16, 1) = Field(300, description="5m or 15m (300 or 900 seconds), no more often than "
                                                            "the pair's policy")
    additional_points: int = Field(0, ge=0, le=24, description="the extended site's own hourly points")
    compression: bool = True
    bandwidth_limit: int | text(32, 1) | None = Field(None, description="bytes/s, \"100M\", or none")
    auth: Literal["certificate", "kerberos"] = "certificate"
    storage: AbsPath | None = Field(None, description="the storage root on the third cloud's hosts (default: "
                                                      "their state directory's replica folder)")

    @field_validator("frequency", mode="after")
    @classmethod
    def _frequency(cls, v):
        from ..orchestration.extended import FREQUENCIES
        seconds = settings.parse_frequency(v)
        if seconds not in FREQUENCIES:
            raise ValueError("the extended leg runs every 5m or 15m (Hyper-V's choices)")
        return int(seconds)

    _bandwidth = field_validator("bandwidth_limit", mode="after")(lambda v: _rate(v))


def _rate(v, parse=settings.parse_bandwidth):
    """A bandwidth limit (or another rate, with its parser) as replicatord parses it (None: unlimited)."""
    if v is None:
        return None
    rate = parse(v)
    if rate is not None and rate >= 2 ** 63:
        raise ValueError("is beyond any link (at most 2^63-1 bytes per second)")
    return rate


class ExtendedOut(Out):
    pair: str
    cloud: str
    frequency: int
    additional_points: int
    compression: bool
    bandwidth_limit: int | None
    auth: str
    storage: str | None
    machines: dict[str, str | None] = Field(description="each machine of the pair: the third cloud's host "
                                                        "holding its extended replica (null: none yet)")
    created_at: dt.datetime


class PairOut(Out):
    id: int
    name: str
    primary: str | None
    recovery: str | None
    policy: str | None
    network_mappings: list[MappingOut]
    storage_mappings: list[MappingOut]
    extended: str | None = Field(None, description="the third cloud of the pair's extended leg, if any")


# ---------------------------------------------------------------------------------------------- policies
class PolicyIn(In):
    """A protection policy; defaults are replicatord's. Frequency and bandwidth take replicatord.toml's forms
    ("5m", 300; "100M", "none")."""

    name: Name
    target_kind: Literal["peer", "azure"] = "peer"
    frequency: int | text(16, 1) = Field(300, description="30s, 5m or 15m (or 30, 300, 900 seconds)")
    additional_points: int = Field(0, ge=0, le=24)
    app_consistent_hours: int = Field(0, ge=0, le=12, description="0: crash-consistent points only")
    compression: bool = True
    auth: Literal["certificate", "kerberos"] = "certificate"
    port: int | None = Field(None, ge=1, le=65535)
    initial_method: Literal["network", "scheduled", "offline", "existing"] = "network"
    initial_at: text(64, 1) | None = Field(None, description="scheduled: 2026-06-01T22:00:00 or 22:00:00")
    initial_seed_dir: AbsPath | None = Field(None, description="offline: where the seed is written")
    initial_path: AbsPath | None = Field(None, description="existing: the disk (or folder) on the replica")
    delete_replica_on_remove: bool = False
    bandwidth_limit: int | text(32, 1) | None = Field(None, description="bytes/s, \"100M\", or none")
    resync: Literal["auto", "manual"] = "auto"
    resync_window: text(16, 1) | None = Field(None, description="HH:MM-HH:MM (resync = auto)")
    azure_storage_account: Annotated[str, Field(pattern=r"^[a-z0-9]{3,24}$")] | None = None
    azure_container: Annotated[str, Field(pattern=r"^[a-z0-9](?:[a-z0-9-]{1,61}[a-z0-9])?$")] | None = None
    azure_encrypt: bool = False
    rpo_threshold: int | text(16, 1) = Field(3600, description="health turns Warning when nothing replicated this "
                                             "long: 90s, 15m, 1h (30 s to 24 h) or seconds")
    copy_rate_when_busy: int | text(32, 1) | None = Field(
        COPY_RATE_WHEN_BUSY, description="bytes/s an initial copy or resync goes at while the guest writes: "
                                         "\"50M\", or none (stored as 0) for full speed")

    @field_validator("frequency", mode="after")
    @classmethod
    def _frequency(cls, v):
        return settings.parse_frequency(v)

    @field_validator("rpo_threshold", mode="after")
    @classmethod
    def _rpo_threshold(cls, v):
        return settings.parse_rpo_threshold(v)

    _bandwidth = field_validator("bandwidth_limit", mode="after")(lambda v: _rate(v))
    _copy_rate = field_validator("copy_rate_when_busy", mode="after")(
        lambda v: _rate(v, settings.parse_copy_rate) or 0)

    @field_validator("resync_window", mode="after")
    @classmethod
    def _window(cls, v):
        if v is not None:
            settings.parse_window(v)
        return v

    @field_validator("initial_at", mode="after")
    @classmethod
    def _at(cls, v):
        if v is not None:
            settings._moment(v)
        return v

    @model_validator(mode="after")
    def _rules(self):
        needs = settings.INITIAL_MODES[self.initial_method]
        given = {"at": self.initial_at, "seed_dir": self.initial_seed_dir, "path": self.initial_path}
        for key, value in given.items():
            if key in needs and value is None:
                raise ValueError(f"initial_{key}: missing: initial_method {self.initial_method!r} needs it")
            if key not in needs and value is not None:
                raise ValueError(f"initial_{key}: does not apply to initial_method {self.initial_method!r}")
        azure = (self.azure_storage_account, self.azure_container)
        if self.target_kind == "azure" and None in azure:
            raise ValueError("azure_storage_account and azure_container: target_kind 'azure' needs both")
        if self.target_kind == "peer" and (any(azure) or self.azure_encrypt):
            raise ValueError("azure_storage_account, azure_container, azure_encrypt: only for target_kind 'azure'")
        window = settings.parse_window(self.resync_window) if self.resync_window else None
        protection = settings.Protection(
            frequency=self.frequency, additional_points=self.additional_points,
            app_consistent_hours=self.app_consistent_hours, compression=self.compression, auth=self.auth,
            port=self.port, resync=self.resync, resync_window=window,
            delete_replica_on_remove=self.delete_replica_on_remove, bandwidth_limit=self.bandwidth_limit)
        problems = settings._contradictions(protection, final=False)
        if problems:
            raise ValueError("; ".join(f"{path}: {why}" for path, why in problems))
        return self


class PolicyOut(Out):
    id: int
    name: str
    target_kind: str
    frequency: int
    additional_points: int
    app_consistent_hours: int
    compression: bool
    auth: str
    port: int | None
    initial_method: str
    initial_at: str | None
    initial_seed_dir: str | None
    initial_path: str | None
    delete_replica_on_remove: bool
    bandwidth_limit: int | None
    resync: str
    resync_window: str | None
    azure_storage_account: str | None
    azure_container: str | None
    azure_encrypt: bool
    rpo_threshold: int
    copy_rate_when_busy: int = Field(description="bytes/s; 0: full speed")
    pairs: list[str]
    created_at: dt.datetime
    updated_at: dt.datetime


# ---------------------------------------------------------------------------------------------- machines
DiskPath = AbsPath
DiskTarget = Annotated[str, Field(pattern=r"^[a-z][a-z0-9]{1,15}$")]


class MachineIn(In):
    """Enable protection of a machine: a libvirt domain, its disk targets mapped to the VHDX files replicatord
    serves it (`{"vda": "/vms/web1-os.vhdx"}`, as in replicatord.toml; `excluded` names targets; until the map
    is given the host is not asked to protect it), or a list of disk files."""

    name: Name
    cloud: Name = Field(description="the primary cloud (it must be in a pair)")
    primary_host: HostRef | None = Field(None, description="the host it runs on (in the cloud)")
    replica_host: HostRef | None = Field(None, description="a host of the recovery cloud; default: chosen")
    domain: text(255, 1) | None = None
    disks: list[DiskPath] | dict[DiskTarget, DiskPath] = Field(
        default_factory=list, max_length=64,
        description="disk files; for a domain, its disk targets mapped to their VHDX files")
    excluded: list[DiskPath | DiskTarget] = Field(default_factory=list, max_length=64)
    policy: Name | None = Field(None, description="default: the pair's policy")

    @model_validator(mode="after")
    def _what(self):
        if self.domain is None and not self.disks:
            raise ValueError("give either domain (a libvirt domain) or disks (paths), not both, not neither")
        if self.domain is None and isinstance(self.disks, dict):
            raise ValueError("disks: only a domain maps disk targets to VHDX files; a machine lists its disk files")
        if self.domain is not None and self.disks and not isinstance(self.disks, dict):
            raise ValueError("disks: a domain maps its disk targets to VHDX files ({\"vda\": \"/vms/x.vhdx\"}), "
                             "not a list (give either domain and that map, or a list of disks)")
        files = list(self.disks.values()) if isinstance(self.disks, dict) else self.disks
        if len(set(files)) != len(files):
            raise ValueError("disks: a disk is listed twice")
        if set(self.excluded) & set(self.disks):
            raise ValueError("excluded: a disk cannot be both protected and excluded")
        return self


class MachinePatch(In):
    """Change a protected machine's policy (null: follow the pair's) or move its replica to another host of
    the recovery cloud (its replica is then built again there). Only the fields given change."""

    policy: Name | None = None
    replica_host: HostRef | None = None


class FailoverIn(In):
    kind: FailoverKind
    force: bool = Field(False, description="unplanned while the primary holds a live lease (recorded)")
    point: int | None = Field(None, ge=0, le=2**53, description="the recovery point (unplanned or test; default: "
                              "the latest); a planned failover takes the final cycle's")


class MachineExtendedOut(Out):
    """The extended leg as its replica host last reported it (Measure-VMReplication -ReplicationRelationshipType
    Extended); state, health and last success are null until that host reports the leg."""

    relationship: Literal["Extended"] = "Extended"
    cloud: str
    host: str | None = Field(description="the third cloud's host holding the extended replica")
    target: str | None
    state: str | None
    health: str | None
    reason: str | None
    last_success_at: dt.datetime | None


class MachineOut(Out):
    id: int
    name: str
    cloud: str
    primary_host: str | None
    replica_host: str | None
    domain: str | None
    disks: list[str] | dict[str, str]
    excluded: list[str]
    policy: str | None
    desired_state: Literal["enabled", "paused", "disabled"]
    observed_state: str | None
    health: str | None
    rpo_seconds: float | None
    last_success_at: dt.datetime | None
    owner_site: str | None
    fencing_epoch: int
    direction: Literal["forward", "failed-over", "committed", "reversed"] = Field(
        description="forward: the primary host runs the machine and replicates to the replica host; failed-over "
                    "/ committed: the replica host runs it; reversed: the replica host runs it and replicates back "
                    "to the primary host (reverse replication; failback next)")
    created_at: dt.datetime
    extended: MachineExtendedOut | None = Field(None, description="the extended relationship, when its pair "
                                                                  "has an extended leg")


# ---------------------------------------------------------------------------------------------- jobs
class JobLogOut(Out):
    at: dt.datetime
    line: str


class JobOut(Out):
    id: int
    kind: str
    state: Literal["queued", "running", "succeeded", "failed", "cancelled", "waiting_for_input"]
    machine: str | None
    host: str | None
    plan_run: int | None
    params: dict
    progress: int
    message: str
    claimed_by: str | None
    lease_expires_at: dt.datetime | None
    cancel_requested: bool
    created_by: str
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    log: list[JobLogOut] | None = None


# ---------------------------------------------------------------------------------------------- plans
class ActionIn(In):
    """One of `script` (argv) or `manual` (a step an operator confirms through the API)."""

    script: list[text(1024, 1)] | None = Field(None, min_length=1, max_length=64)
    manual: text(2000, 1) | None = None
    timeout: float | None = Field(None, gt=0, le=7 * 86400)
    kinds: list[FailoverKind] | None = Field(None, min_length=1, max_length=3)

    @model_validator(mode="after")
    def _one(self):
        if (self.script is None) == (self.manual is None):
            raise ValueError("an action needs exactly one of script (argv) or manual (text)")
        return self


class GroupIn(In):
    members: list[Name] = Field(default_factory=list, max_length=500)
    pre: list[ActionIn] = Field(default_factory=list, max_length=20)
    post: list[ActionIn] = Field(default_factory=list, max_length=20)

    @model_validator(mode="after")
    def _not_empty(self):
        if not (self.members or self.pre or self.post):
            raise ValueError("a group needs members, pre or post actions")
        return self


class PlanIn(In):
    name: Name
    pair: Name
    description: Description = ""
    groups: list[GroupIn] = Field(min_length=1, max_length=MAX_GROUPS)

    @model_validator(mode="after")
    def _members_once(self):
        """The orchestrator's own rules for a plan (a machine in one group, at most 7 groups)."""
        try:
            RecoveryPlan(self.name, [PlanGroup(list(g.members)) for g in self.groups])
        except PlanError as e:
            raise ValueError(f"groups: {e.message}") from None
        return self


class ActionOut(Out):
    id: int
    phase: str
    script: list[str] | None
    manual: str | None
    timeout: float | None
    kinds: list[str] | None


class GroupOut(Out):
    position: int
    members: list[str]
    pre: list[ActionOut]
    post: list[ActionOut]


class PlanOut(Out):
    id: int
    name: str
    pair: str
    description: str
    groups: list[GroupOut]
    created_at: dt.datetime


class PlanRunIn(In):
    kind: FailoverKind
    force: bool = False


class ConfirmIn(In):
    action_id: int = Field(ge=1, le=2 ** 31 - 1)
    note: text(500) = ""


class PlanRunOut(Out):
    id: int
    plan: str
    kind: str
    state: str
    current_group: int
    waiting_action_id: int | None
    confirmations: list[dict]
    forced: bool
    created_by: str
    created_at: dt.datetime
    finished_at: dt.datetime | None
    job: int | None


# ---------------------------------------------------------------------------------------------- access
class TokenIn(In):
    name: Name
    role: Literal["read-only", "operator", "admin"]


class TokenOut(Out):
    name: str
    role: str
    created_by: str
    created_at: dt.datetime
    last_used_at: dt.datetime | None
    revoked_at: dt.datetime | None


class TokenCreated(TokenOut):
    token: str = Field(description="the secret; shown once, only its hash is kept")


class AuditOut(Out):
    id: int
    at: dt.datetime
    actor: str
    action: str
    target: str
    outcome: str
    detail: dict
