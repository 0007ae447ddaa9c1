"""A bounded fuzzing pass over the replica HTTP API: random and mutated requests from an authenticated
primary (real mutual TLS) on every route, against a disk it owns and ids it makes up. No answer is a 500,
every refusal is a one-line JSON error, no traceback is logged, and nothing is left behind: the disk's
image, state and files are as before, and no disk, spool or lock appears."""
from __future__ import annotations

import json
import logging
import uuid

import aiohttp
from hypothesis import HealthCheck, given, settings, strategies as st

from replicator.transport import AuthorizationEntry

from .conftest import Peer, Primary, image_bytes, run, tree

METHODS = st.sampled_from(["GET", "PUT", "POST", "DELETE", "PATCH"])
SEGMENTS = st.one_of(st.sampled_from(["", "digests", "checkpoint", "uploads/ab12", "uploads/ab12/commit",
                                      "uploads/..", "uploads/ab12?offset=0", "uploads/zz", "%00", "..%2f..",
                                      "uploads/" + "a" * 80]),
                     st.text(alphabet="abcdef0123456789-/?=%.&", max_size=30))
JSONS = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.text(max_size=20),
                               st.floats(allow_nan=False)),
                     lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
                         st.sampled_from(["size", "block_size", "name", "machine", "generation", "point",
                                          "prepared", "additional_points"]), kids, max_size=5), max_leaves=12)
BODIES = st.one_of(JSONS.map(lambda v: json.dumps(v).encode()), st.binary(max_size=300))


def test_random_requests_leave_nothing_behind(servers, pki, tmp_path, caplog):
    root = str(tmp_path / "root")
    server = servers.cert([AuthorizationEntry("primary1", root)], max_disk_size=1 << 30)
    peer = Peer(server, pki, tmp_path, "primary1")
    p = Primary()
    peer.call("ensure_disk", p.disk_id, p.size)
    peer.send(p.disk_id, p.cycle())
    disk = server._stores[root].disk(p.disk_id)
    good, before_tree = image_bytes(disk), tree(root)
    before_state = open(disk.state_path).read()
    ids = st.sampled_from([str(p.disk_id), str(uuid.UUID(int=7)), "not-a-uuid", str(p.disk_id).upper()])
    answers = []

    async def send(method, disk_id, seg, body, query):
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=peer.ssl())) as s:
            url = f"{server.url}/v1/disks/{disk_id}/{seg}".rstrip("/")
            async with s.request(method, url, data=body, params=query) as r:
                return r.status, await r.read()

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
    @given(METHODS, ids, SEGMENTS, BODIES,
           st.dictionaries(st.sampled_from(["offset", "block_size", "reason"]),
                           st.text(alphabet="0123456789-abcx", max_size=25), max_size=2))
    def one(method, disk_id, seg, body, query):
        if (method in ("PUT", "POST", "DELETE") and disk_id.lower() == str(p.disk_id)
                and seg.split("?")[0].strip("/") in ("", "checkpoint")):
            return                   # a PUT, checkpoint or delete of our own disk may legitimately change it
        status, raw = run(send(method, disk_id, seg, body, query))
        answers.append(status)
        assert status < 500, (method, disk_id, seg, body, query, status, raw)
        if status >= 400 and raw.startswith(b"{"):
            err = json.loads(raw)
            assert "\n" not in err["message"] and "Traceback" not in err["message"]

    with caplog.at_level(logging.WARNING):
        one()
    assert not any(r.exc_info for r in caplog.records), [r.getMessage() for r in caplog.records if r.exc_info]
    assert "Traceback" not in caplog.text
    fresh = server._stores[root].disk(p.disk_id)
    assert image_bytes(fresh) == good and fresh.generation == 1
    assert {k: v for k, v in tree(root).items() if not k.endswith("state.json")} == \
        {k: v for k, v in before_tree.items() if not k.endswith("state.json")}
    state = json.loads(open(disk.state_path).read())
    old = json.loads(before_state)
    assert {k: v for k, v in state.items() if k != "counters"} == {k: v for k, v in old.items() if k != "counters"}
    assert not any(len(k) > 2 for k in server._locks)
    assert len(answers) > 50
