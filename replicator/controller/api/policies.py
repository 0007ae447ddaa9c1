"""Protection policies (admin): every ASR policy setting, validated as replicatord.toml is. A change reaches
every host whose machines follow the policy (their desired revision is bumped)."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Path, Request, Response
from sqlalchemy import func, select

from .. import models as m
from .. import schemas as sc
from ..auth import admin, reader
from .common import DB, ERRORS, bump_revision, conflict, note, one
from .topology import auth_mismatch, extended_policy_problem

router = APIRouter(prefix="/v1", responses=ERRORS, tags=["policies"])
NamePath = Path(pattern=sc.NAME_PATTERN)
FIELDS = [f for f in sc.PolicyIn.model_fields if f != "name"]


def policy_out(s, p: m.ProtectionPolicy) -> sc.PolicyOut:
    pairs = s.scalars(select(m.CloudPair.name).join(m.PolicyAssociation)
                      .where(m.PolicyAssociation.policy_id == p.id).order_by(m.CloudPair.name)).all()
    return sc.PolicyOut(id=p.id, name=p.name, pairs=list(pairs), created_at=p.created_at, updated_at=p.updated_at,
                        **{f: getattr(p, f) for f in FIELDS})


def _hosts_following(s, p: m.ProtectionPolicy) -> list[str]:
    """Hosts of machines that follow the policy, directly or through their pair."""
    pair_ids = select(m.PolicyAssociation.pair_id).where(m.PolicyAssociation.policy_id == p.id)
    cloud_ids = select(m.Cloud.id).where(m.Cloud.pair_id.in_(pair_ids))
    rows = s.execute(select(m.Machine.primary_host_id, m.Machine.replica_host_id).where(
        (m.Machine.policy_id == p.id) | ((m.Machine.policy_id.is_(None)) & m.Machine.cloud_id.in_(cloud_ids))))
    return [h for row in rows for h in row]


@router.get("/policies", response_model=list[sc.PolicyOut], dependencies=[Depends(reader)])
def list_policies(s: DB):
    return [policy_out(s, p) for p in s.scalars(select(m.ProtectionPolicy).order_by(m.ProtectionPolicy.name))]


@router.post("/policies", status_code=201, response_model=sc.PolicyOut)
def create_policy(body: sc.PolicyIn, s: DB, request: Request, _=Depends(admin)):
    note(request, f"policy/{body.name}")
    if s.scalar(select(m.ProtectionPolicy.id).where(m.ProtectionPolicy.name == body.name)):
        raise conflict(f"policy {body.name!r} already exists")
    p = m.ProtectionPolicy(name=body.name, **{f: getattr(body, f) for f in FIELDS})
    s.add(p)
    s.flush()
    return policy_out(s, p)


@router.get("/policies/{name}", response_model=sc.PolicyOut, dependencies=[Depends(reader)])
def get_policy(s: DB, name: str = NamePath):
    return policy_out(s, one(s, m.ProtectionPolicy, "policy", name=name))


@router.put("/policies/{name}", response_model=sc.PolicyOut)
def replace_policy(body: sc.PolicyIn, s: DB, request: Request, name: str = NamePath, _=Depends(admin)):
    """Replace every setting (the body is a whole policy; its name must be the URL's)."""
    note(request, f"policy/{name}")
    p = one(s, m.ProtectionPolicy, "policy", name=name)
    if body.name != name:
        raise conflict(f"name: a policy is not renamed ({body.name!r} != {name!r})")
    for f in FIELDS:
        setattr(p, f, getattr(body, f))
    for pair in s.scalars(select(m.CloudPair).join(m.PolicyAssociation).join(m.ExtendedPair)
                          .where(m.PolicyAssociation.policy_id == p.id).order_by(m.CloudPair.name)):
        why = extended_policy_problem(pair.extended, p)
        if why:
            raise conflict(f"pair {pair.name!r}: {why}")
    s.flush()
    # each pair checked once: those following p, then those of machines with p as their own policy
    checked = set()
    pairs = list(s.scalars(select(m.CloudPair).join(m.PolicyAssociation).where(m.PolicyAssociation.policy_id == p.id)))
    pairs += [x.cloud.pair for x in s.scalars(select(m.Machine).where(m.Machine.policy_id == p.id))]
    for pair in pairs:
        if pair is None or pair.association is None or pair.id in checked:
            continue
        checked.add(pair.id)
        if why := auth_mismatch(s, pair, pair.association.policy):
            raise conflict(why)
    p.updated_at = m.utcnow()
    s.flush()
    bump_revision(s, _hosts_following(s, p))
    return policy_out(s, p)


@router.delete("/policies/{name}", status_code=204, response_class=Response)
def delete_policy(s: DB, request: Request, name: str = NamePath, _=Depends(admin)):
    note(request, f"policy/{name}")
    p = one(s, m.ProtectionPolicy, "policy", name=name)
    pairs = s.scalar(select(func.count()).select_from(m.PolicyAssociation)
                     .where(m.PolicyAssociation.policy_id == p.id))
    machines = s.scalar(select(func.count()).select_from(m.Machine).where(m.Machine.policy_id == p.id))
    if pairs or machines:
        raise conflict(f"policy {name!r} is in use ({pairs} pair(s), {machines} machine(s))")
    s.delete(p)
