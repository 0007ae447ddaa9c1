"""Sites, hosts, clouds, cloud pairs and their network and storage mappings (admin to change, read-only to see).

A cloud belongs to one pair only and a pair joins clouds of two different sites; a host belongs to a cloud
of its own site. Changes that alter what hosts run bump their desired revision.
"""
from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Path, Request, Response
from sqlalchemy import func, select

from .. import desired
from .. import models as m
from .. import schemas as sc
from ..auth import admin, reader
from .common import DB, ERRORS, bump_revision, conflict, find_host, note, one, pair_hosts, ref

router = APIRouter(prefix="/v1", responses=ERRORS)
NamePath = Path(pattern=sc.NAME_PATTERN)
HostPath = Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")


def _taken(s, model, name: str, what: str) -> None:
    if s.scalar(select(model.id).where(model.name == name)) is not None:
        raise conflict(f"{what} {name!r} already exists")


# ---------------------------------------------------------------------------------------------- sites
def site_out(site: m.Site) -> sc.SiteOut:
    return sc.SiteOut.model_validate(site)


@router.get("/sites", response_model=list[sc.SiteOut], dependencies=[Depends(reader)], tags=["sites"])
def list_sites(s: DB):
    return [site_out(x) for x in s.scalars(select(m.Site).order_by(m.Site.name))]


@router.post("/sites", status_code=201, response_model=sc.SiteOut, tags=["sites"])
def create_site(body: sc.SiteIn, s: DB, request: Request, _=Depends(admin)):
    note(request, f"site/{body.name}")
    _taken(s, m.Site, body.name, "site")
    site = m.Site(name=body.name, description=body.description)
    s.add(site)
    s.flush()
    return site_out(site)


@router.get("/sites/{name}", response_model=sc.SiteOut, dependencies=[Depends(reader)], tags=["sites"])
def get_site(s: DB, name: str = NamePath):
    return site_out(one(s, m.Site, "site", name=name))


@router.delete("/sites/{name}", status_code=204, response_class=Response, tags=["sites"])
def delete_site(s: DB, request: Request, name: str = NamePath, _=Depends(admin)):
    note(request, f"site/{name}")
    site = one(s, m.Site, "site", name=name)
    used = [what for model, what in ((m.Cloud, "clouds"), (m.Host, "hosts"))
            if s.scalar(select(func.count()).select_from(model).where(model.site_id == site.id))]
    if used:
        raise conflict(f"site {name!r} still has {' and '.join(used)}")
    s.delete(site)


# ---------------------------------------------------------------------------------------------- hosts
def host_out(h: m.Host) -> sc.HostOut:
    return sc.HostOut(id=h.id, hostname=h.hostname, site=h.site.name, cloud=h.cloud.name if h.cloud else None,
                      admin_url=h.admin_url, data_url=h.data_url, cert_not_after=h.cert_not_after,
                      registered_at=h.registered_at, last_seen=h.last_seen, desired_revision=h.desired_revision,
                      applied_revision=h.applied_revision)


def _host(s, ref_: str) -> m.Host:
    h = find_host(s, ref_)
    if h is None:
        raise HTTPException(404, f"no host {ref_!r}")
    return h


@router.get("/hosts", response_model=list[sc.HostOut], dependencies=[Depends(reader)], tags=["hosts"])
def list_hosts(s: DB):
    return [host_out(h) for h in s.scalars(select(m.Host).order_by(m.Host.hostname))]


@router.get("/hosts/{host}", response_model=sc.HostOut, dependencies=[Depends(reader)], tags=["hosts"])
def get_host(s: DB, host: str = HostPath):
    return host_out(_host(s, host))


@router.put("/hosts/{host}/cloud", response_model=sc.HostOut, tags=["hosts"])
def set_host_cloud(body: sc.HostCloudIn, s: DB, request: Request, host: str = HostPath, _=Depends(admin)):
    """Put a registered host in a cloud of its site (or take it out with null)."""
    h = _host(s, host)
    note(request, f"host/{h.hostname}", cloud=body.cloud)
    # its clouds (now and asked) held before counting what is placed on it: enabling a machine locks its cloud
    s.scalars(select(m.Cloud.id).where((m.Cloud.id == h.cloud_id) | (m.Cloud.name == body.cloud))
              .order_by(m.Cloud.id).with_for_update()).all()
    cloud = ref(s, m.Cloud, "cloud", "cloud", name=body.cloud) if body.cloud else None
    if cloud and cloud.site_id != h.site_id:
        raise HTTPException(422, f"cloud: {cloud.name!r} is on site {cloud.site.name!r}, host {h.hostname!r} "
                                 f"on {h.site.name!r}")
    placed = s.scalar(select(func.count()).select_from(m.Machine).where(
        (m.Machine.primary_host_id == h.id) | (m.Machine.replica_host_id == h.id)))
    placed += s.scalar(select(func.count()).select_from(m.ExtendedPlacement)
                       .where(m.ExtendedPlacement.host_id == h.id))
    if placed and (cloud is None or cloud.id != h.cloud_id):
        raise conflict(f"host {h.hostname!r} has {placed} machine(s) placed on it: move or disable them first")
    h.cloud = cloud
    bump_revision(s, [h.id])
    s.flush()
    if cloud is not None:
        desired.place_extended(s)            # a first host of a third cloud takes the extended replicas
    return host_out(h)


# ---------------------------------------------------------------------------------------------- clouds
def cloud_out(c: m.Cloud) -> sc.CloudOut:
    return sc.CloudOut(id=c.id, name=c.name, site=c.site.name, description=c.description,
                       pair=c.pair.name if c.pair else None, pair_role=c.pair_role,
                       hosts=sorted(h.hostname for h in c.hosts))


@router.get("/clouds", response_model=list[sc.CloudOut], dependencies=[Depends(reader)], tags=["clouds"])
def list_clouds(s: DB):
    return [cloud_out(c) for c in s.scalars(select(m.Cloud).order_by(m.Cloud.name))]


@router.post("/clouds", status_code=201, response_model=sc.CloudOut, tags=["clouds"])
def create_cloud(body: sc.CloudIn, s: DB, request: Request, _=Depends(admin)):
    note(request, f"cloud/{body.name}")
    site = ref(s, m.Site, "site", "site", name=body.site)
    _taken(s, m.Cloud, body.name, "cloud")
    cloud = m.Cloud(name=body.name, site=site, description=body.description)
    s.add(cloud)
    s.flush()
    return cloud_out(cloud)


@router.get("/clouds/{name}", response_model=sc.CloudOut, dependencies=[Depends(reader)], tags=["clouds"])
def get_cloud(s: DB, name: str = NamePath):
    return cloud_out(one(s, m.Cloud, "cloud", name=name))


@router.delete("/clouds/{name}", status_code=204, response_class=Response, tags=["clouds"])
def delete_cloud(s: DB, request: Request, name: str = NamePath, _=Depends(admin)):
    note(request, f"cloud/{name}")
    cloud = one(s, m.Cloud, "cloud", name=name)
    if cloud.pair is not None:
        raise conflict(f"cloud {name!r} is in pair {cloud.pair.name!r}: delete the pair first")
    third = s.scalar(select(m.ExtendedPair).where(m.ExtendedPair.cloud_id == cloud.id))
    if third is not None:
        raise conflict(f"cloud {name!r} is the extended cloud of pair {third.pair.name!r}: delete that extended "
                       "leg first")
    if cloud.hosts:
        raise conflict(f"cloud {name!r} still has hosts: {', '.join(sorted(h.hostname for h in cloud.hosts))}")
    if s.scalar(select(func.count()).select_from(m.Machine).where(m.Machine.cloud_id == cloud.id)):
        raise conflict(f"cloud {name!r} still has protected machines")
    s.delete(cloud)


# ---------------------------------------------------------------------------------------------- pairs
def pair_out(p: m.CloudPair) -> sc.PairOut:
    primary, recovery = p.cloud("primary"), p.cloud("recovery")
    return sc.PairOut(
        id=p.id, name=p.name, primary=primary.name if primary else None,
        recovery=recovery.name if recovery else None,
        policy=p.association.policy.name if p.association else None,
        extended=p.extended.cloud.name if p.extended else None,
        network_mappings=[sc.MappingOut(id=x.id, source=x.source_network, target=x.target_network)
                          for x in sorted(p.network_mappings, key=lambda x: x.id)],
        storage_mappings=[sc.MappingOut(id=x.id, source=x.source_root, target=x.target_root)
                          for x in sorted(p.storage_mappings, key=lambda x: x.id)])


@router.get("/pairs", response_model=list[sc.PairOut], dependencies=[Depends(reader)], tags=["pairs"])
def list_pairs(s: DB):
    return [pair_out(p) for p in s.scalars(select(m.CloudPair).order_by(m.CloudPair.name))]


@router.post("/pairs", status_code=201, response_model=sc.PairOut, tags=["pairs"])
def create_pair(body: sc.PairIn, s: DB, request: Request, _=Depends(admin)):
    """Pair a primary cloud with a recovery cloud on another site; each cloud can be in one pair only."""
    note(request, f"pair/{body.name}", primary=body.primary, recovery=body.recovery, policy=body.policy)
    # both clouds locked in one order (by id) before their pair is read: a concurrent pair of either waits
    s.scalars(select(m.Cloud).where(m.Cloud.name.in_([body.primary, body.recovery])).order_by(m.Cloud.id)
              .with_for_update()).all()
    primary = ref(s, m.Cloud, "cloud", "primary", name=body.primary)
    recovery = ref(s, m.Cloud, "cloud", "recovery", name=body.recovery)
    policy = ref(s, m.ProtectionPolicy, "policy", "policy", name=body.policy) if body.policy else None
    if primary.id == recovery.id:
        raise HTTPException(422, "recovery: a cloud cannot be paired with itself")
    if primary.site_id == recovery.site_id:
        raise HTTPException(422, f"recovery: {recovery.name!r} is on the primary cloud's site "
                                 f"({primary.site.name!r}); a recovery cloud is on another site")
    _taken(s, m.CloudPair, body.name, "pair")
    for cloud in (primary, recovery):
        if cloud.pair_id is not None:
            raise conflict(f"cloud {cloud.name!r} is already in pair {cloud.pair.name!r} (a cloud belongs to "
                           f"one pair only)")
        third = s.scalar(select(m.ExtendedPair).where(m.ExtendedPair.cloud_id == cloud.id))
        if third is not None:
            raise conflict(f"cloud {cloud.name!r} is the extended cloud of pair {third.pair.name!r} (a cloud "
                           "has one role)")
    pair = m.CloudPair(name=body.name)
    s.add(pair)
    s.flush()
    primary.pair, primary.pair_role = pair, "primary"
    recovery.pair, recovery.pair_role = pair, "recovery"
    if policy:
        pair.association = m.PolicyAssociation(policy=policy)
    s.flush()
    bump_revision(s, pair_hosts(pair))
    return pair_out(pair)


@router.get("/pairs/{name}", response_model=sc.PairOut, dependencies=[Depends(reader)], tags=["pairs"])
def get_pair(s: DB, name: str = NamePath):
    return pair_out(one(s, m.CloudPair, "pair", name=name))


@router.put("/pairs/{name}/policy", response_model=sc.PairOut, tags=["pairs"])
def set_pair_policy(body: sc.PairPolicyIn, s: DB, request: Request, name: str = NamePath, _=Depends(admin)):
    """Associate a policy with the pair (or none); every host of the pair gets the change."""
    note(request, f"pair/{name}", policy=body.policy)
    pair = one(s, m.CloudPair, "pair", name=name)
    policy = ref(s, m.ProtectionPolicy, "policy", "policy", name=body.policy) if body.policy else None
    if policy is None and _machines_of(s, pair):
        raise conflict(f"pair {name!r} protects machines: they need a policy")
    if policy is not None and (why := auth_mismatch(s, pair, policy)):
        raise conflict(f"policy: {why}")
    if pair.extended is not None:
        if policy is None:
            raise conflict(f"pair {name!r} has an extended leg: it needs a policy (the leg runs no more often)")
        why = extended_policy_problem(pair.extended, policy)
        if why:
            raise conflict(f"policy: {why}")
    if pair.association is not None:
        s.delete(pair.association)
        s.flush()
    if policy is not None:
        pair.association = m.PolicyAssociation(pair_id=pair.id, policy=policy)
    s.flush()
    s.refresh(pair)
    bump_revision(s, pair_hosts(pair))
    return pair_out(pair)


def _machines_of(s, pair: m.CloudPair) -> int:
    """Machines protected in the pair's clouds, with those clouds locked until the change commits (a machine
    being enabled in one of them meanwhile locks its cloud too: one of the two waits and sees the other)."""
    ids = [c.id for c in pair.clouds]
    s.scalars(select(m.Cloud.id).where(m.Cloud.id.in_(ids)).order_by(m.Cloud.id).with_for_update()).all()
    return s.scalar(select(func.count()).select_from(m.Machine).where(m.Machine.cloud_id.in_(ids))) if ids else 0


@router.delete("/pairs/{name}", status_code=204, response_class=Response, tags=["pairs"])
def delete_pair(s: DB, request: Request, name: str = NamePath, _=Depends(admin)):
    note(request, f"pair/{name}")
    pair = one(s, m.CloudPair, "pair", name=name)
    if _machines_of(s, pair):
        raise conflict(f"pair {name!r} still protects machines: disable and remove them first")
    if s.scalar(select(func.count()).select_from(m.RecoveryPlan).where(m.RecoveryPlan.pair_id == pair.id)):
        raise conflict(f"pair {name!r} has recovery plans: delete them first")
    hosts = pair_hosts(pair)
    for cloud in list(pair.clouds):
        cloud.pair, cloud.pair_role = None, None
    s.flush()
    s.delete(pair)
    bump_revision(s, hosts)


# ---------------------------------------------------------------------------------------------- mappings
MAPPINGS = {"network-mappings": (m.NetworkMapping, "source_network", "target_network", sc.NetworkMappingIn),
            "storage-mappings": (m.StorageMapping, "source_root", "target_root", sc.StorageMappingIn)}


def _add_mapping(kind: str, body, s, request: Request, name: str) -> sc.PairOut:
    model, src, dst, _ = MAPPINGS[kind]
    note(request, f"pair/{name}/{kind}", source=body.source, target=body.target)
    pair = one(s, m.CloudPair, "pair", name=name)
    if s.scalar(select(model.id).where(model.pair_id == pair.id, getattr(model, src) == body.source)):
        raise conflict(f"pair {name!r} already maps {body.source!r}: delete that mapping first")
    s.add(model(pair_id=pair.id, **{src: body.source, dst: body.target}))
    s.flush()
    s.refresh(pair)
    bump_revision(s, pair_hosts(pair))
    return pair_out(pair)


def _delete_mapping(kind: str, s, request: Request, name: str, mapping_id: int) -> None:
    model = MAPPINGS[kind][0]
    note(request, f"pair/{name}/{kind}/{mapping_id}")
    pair = one(s, m.CloudPair, "pair", name=name)
    mapping = s.scalar(select(model).where(model.id == mapping_id, model.pair_id == pair.id))
    if mapping is None:
        raise HTTPException(404, f"pair {name!r} has no {kind[:-1]} {mapping_id}")
    s.delete(mapping)
    bump_revision(s, pair_hosts(pair))


MappingId = Path(ge=1, le=2 ** 31 - 1)


@router.post("/pairs/{name}/network-mappings", status_code=201, response_model=sc.PairOut, tags=["pairs"])
def add_network_mapping(body: sc.NetworkMappingIn, s: DB, request: Request, name: str = NamePath,
                        _=Depends(admin)):
    """Map a source network to a target network for the pair's failovers."""
    return _add_mapping("network-mappings", body, s, request, name)


@router.delete("/pairs/{name}/network-mappings/{mapping_id}", status_code=204, response_class=Response,
               tags=["pairs"])
def delete_network_mapping(s: DB, request: Request, name: str = NamePath, mapping_id: int = MappingId,
                           _=Depends(admin)):
    _delete_mapping("network-mappings", s, request, name, mapping_id)


@router.post("/pairs/{name}/storage-mappings", status_code=201, response_model=sc.PairOut, tags=["pairs"])
def add_storage_mapping(body: sc.StorageMappingIn, s: DB, request: Request, name: str = NamePath,
                        _=Depends(admin)):
    """Map a source storage root (a folder of disks) to the replica's storage root."""
    return _add_mapping("storage-mappings", body, s, request, name)


@router.delete("/pairs/{name}/storage-mappings/{mapping_id}", status_code=204, response_class=Response,
               tags=["pairs"])
def delete_storage_mapping(s: DB, request: Request, name: str = NamePath, mapping_id: int = MappingId,
                           _=Depends(admin)):
    _delete_mapping("storage-mappings", s, request, name, mapping_id)


def auth_mismatch(s, pair: m.CloudPair, pair_policy: m.ProtectionPolicy) -> str | None:
    """Why the pair cannot follow `pair_policy` (None: it can): a machine of it has its own policy that
    authenticates otherwise, and the replica hosts have one listener (desired.py renders it from the pair's)."""
    primary = pair.cloud("primary")
    if primary is None or pair_policy.target_kind != "peer":
        return None
    for x in s.scalars(select(m.Machine).where(m.Machine.cloud_id == primary.id, m.Machine.policy_id.is_not(None))
                       .order_by(m.Machine.name)):
        if x.policy.id != pair_policy.id and x.policy.target_kind == "peer" and x.policy.auth != pair_policy.auth:
            return (f"machine {x.name!r} follows policy {x.policy.name!r} ({x.policy.auth}); the replica hosts "
                    f"of pair {pair.name!r} would listen for {pair_policy.auth}")
    return None


# ---------------------------------------------------------------------------------------------- extended leg
def extended_policy_problem(ext: m.ExtendedPair, policy: m.ProtectionPolicy) -> str | None:
    """Why a pair following `policy` cannot feed this extended leg (None: it can): the leg forwards what
    the replica applied, so it runs no more often than the primary leg, from a replica host of ours."""
    if policy.target_kind != "peer":
        return f"policy {policy.name!r} replicates to Azure: an extended leg runs from a replica host"
    if ext.frequency < policy.frequency:
        return (f"the extended leg runs every {ext.frequency} s, more often than policy {policy.name!r}'s "
                f"{policy.frequency} s (it runs no more often than the primary leg)")
    return None


def _extended_out(s, p: m.CloudPair) -> sc.ExtendedOut:
    x, primary, placed = p.extended, p.cloud("primary"), {}
    if primary is not None:
        for mach in s.scalars(select(m.Machine).where(m.Machine.cloud_id == primary.id).order_by(m.Machine.name)):
            placed[mach.name] = mach.extended_host.hostname if mach.extended_host else None
    return sc.ExtendedOut(pair=p.name, cloud=x.cloud.name, frequency=x.frequency,
                          additional_points=x.additional_points, compression=x.compression,
                          bandwidth_limit=x.bandwidth_limit, auth=x.auth, storage=x.storage, machines=placed,
                          created_at=x.created_at)


def _extended_hosts(p: m.CloudPair) -> list[str]:
    return pair_hosts(p) + ([h.id for h in p.extended.cloud.hosts] if p.extended else [])


@router.post("/pairs/{name}/extended", status_code=201, response_model=sc.ExtendedOut, tags=["pairs"])
def create_extended(body: sc.ExtendedIn, s: DB, request: Request, name: str = NamePath, _=Depends(admin)):
    """Give the pair an extended leg (Hyper-V's extended replication): its recovery cloud's hosts forward each
    machine to a host of a third cloud, on a third site, every 5 or 15 minutes (no more often than the
    pair's policy), with the leg's own points, compression, bandwidth limit and authentication."""
    note(request, f"pair/{name}/extended", cloud=body.cloud, frequency=body.frequency)
    pair = one(s, m.CloudPair, "pair", name=name)
    # the pair's clouds and the third cloud locked in one order (by id): a pair made of the third cloud meanwhile
    # waits, and sees it taken
    s.scalars(select(m.Cloud).where(m.Cloud.id.in_([c.id for c in pair.clouds]) | (m.Cloud.name == body.cloud))
              .order_by(m.Cloud.id).with_for_update()).all()
    cloud = ref(s, m.Cloud, "cloud", "cloud", name=body.cloud)
    if pair.extended is not None:
        raise conflict(f"pair {name!r} already has an extended leg (to cloud {pair.extended.cloud.name!r}): "
                       "delete it first")
    if cloud.pair_id is not None:
        raise HTTPException(422, f"cloud: {cloud.name!r} is in pair {cloud.pair.name!r}; the extended cloud is "
                                 "a third one")
    sites = {c.site_id: c.site.name for c in pair.clouds}
    if cloud.site_id in sites:
        raise HTTPException(422, f"cloud: {cloud.name!r} is on site {sites[cloud.site_id]!r}, one of the pair's "
                                 "sites; the extended replica is on a third site")
    taken = s.scalar(select(m.ExtendedPair).where(m.ExtendedPair.cloud_id == cloud.id))
    if taken is not None:
        raise conflict(f"cloud {cloud.name!r} is already the extended cloud of pair {taken.pair.name!r}")
    if pair.association is None:
        raise HTTPException(422, f"pair {name!r} has no policy: associate one first (the extended leg runs no "
                                 "more often than it)")
    ext = m.ExtendedPair(pair_id=pair.id, cloud_id=cloud.id, frequency=body.frequency,
                         additional_points=body.additional_points, compression=body.compression,
                         bandwidth_limit=body.bandwidth_limit, auth=body.auth, storage=body.storage)
    ext.cloud = cloud
    why = extended_policy_problem(ext, pair.association.policy)
    if why:
        raise HTTPException(422, f"frequency: {why}")
    s.add(ext)
    s.flush()
    s.refresh(pair)
    desired.place_extended(s)
    bump_revision(s, _extended_hosts(pair))
    return _extended_out(s, pair)


@router.get("/pairs/{name}/extended", response_model=sc.ExtendedOut, dependencies=[Depends(reader)],
            tags=["pairs"])
def get_extended(s: DB, name: str = NamePath):
    pair = one(s, m.CloudPair, "pair", name=name)
    if pair.extended is None:
        raise HTTPException(404, f"pair {name!r} has no extended leg")
    return _extended_out(s, pair)


@router.delete("/pairs/{name}/extended", status_code=204, response_class=Response, tags=["pairs"])
def delete_extended(s: DB, request: Request, name: str = NamePath, _=Depends(admin)):
    """Remove the pair's extended leg: the replica hosts stop forwarding (the third site keeps what it holds)
    and the machines' extended placements are forgotten."""
    note(request, f"pair/{name}/extended")
    pair = one(s, m.CloudPair, "pair", name=name)
    if pair.extended is None:
        raise HTTPException(404, f"pair {name!r} has no extended leg")
    hosts = _extended_hosts(pair)
    primary = pair.cloud("primary")
    if primary is not None:
        ids = select(m.Machine.id).where(m.Machine.cloud_id == primary.id)
        for placement in s.scalars(select(m.ExtendedPlacement).where(m.ExtendedPlacement.machine_id.in_(ids))):
            s.delete(placement)
    s.delete(pair.extended)
    s.flush()
    bump_revision(s, hosts)
