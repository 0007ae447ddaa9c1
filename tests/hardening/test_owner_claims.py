"""Ownership claims from several processes at once (the replica server and `seed import` in one storage
root): every claim is kept -- the read-modify-write of owners.json is serialized across processes."""
from __future__ import annotations

import multiprocessing
import uuid

from replicator.transport.auth import AuthorizationEntry, Ownership


def _claim_many(root: str, group: str, ids: list[str]) -> None:
    own = Ownership(root)
    entry = AuthorizationEntry("p-" + group, root, group)
    for disk_id in ids:
        own.claim(disk_id, entry)


def test_concurrent_claims_from_processes_are_all_kept(tmp_path):
    root = str(tmp_path)
    ctx = multiprocessing.get_context("fork")
    batches = {f"g{k}": [str(uuid.uuid4()) for _ in range(40)] for k in range(4)}
    procs = [ctx.Process(target=_claim_many, args=(root, g, ids)) for g, ids in batches.items()]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    own = Ownership(root)
    for g, ids in batches.items():
        assert [own.owner(i) for i in ids] == [g] * len(ids)
