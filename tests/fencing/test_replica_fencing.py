"""The replica side of fencing, over real mutual TLS: epochs adopted and compared on every disk route, a
failover on the replica site raising the epoch by itself, stale epochs refused (409 fenced, counted),
requests without an epoch as before, old state files, and a fuzzed header (one-line 400, never 500)."""
from __future__ import annotations

import json
import random
import uuid

import pytest

from replicator.replica import ReplicaStore
from replicator.transport import Fenced, ReplicaClient, ReplicaRefused

from .conftest import Primary, image_bytes, run, write


def client(server, pki, epoch=None) -> ReplicaClient:
    return ReplicaClient(server.url, retries=0, epoch=epoch, **pki.pair("primary1"))


def cycle(server, pki, tmp_path, primary: Primary, epoch, n: int, path: str | None = None) -> dict:
    """One cycle of `primary` (or the stream at `path`) sent at `epoch`: ensure, upload, commit, checkpoint."""
    path = path or write(tmp_path, f"{primary.disk_id}-{n}.delta", primary.cycle())

    async def go():
        async with client(server, pki, epoch) as c:
            await c.ensure_disk(primary.disk_id, primary.size, machine="vm01")
            answer = await c.send_stream(primary.disk_id, uuid.uuid4().hex, path)
            await c.checkpoint(primary.disk_id, answer["generation"], n)
            return answer
    return run(go())


def disk_of(server, tmp_path, primary: Primary):
    return server._stores[str(tmp_path / "root")].disk(primary.disk_id)


def every_route(c: ReplicaClient, disk_id, stream: str, path: str):
    """One call per disk route, as the primary makes them (the domain route through its request path)."""
    return {
        "PUT disk": lambda: c.ensure_disk(disk_id, 16 << 20, machine="vm01"),
        "GET disk": lambda: c.state(disk_id),
        "digests": lambda: c.digests(disk_id, 65536),
        "checkpoint": lambda: c.checkpoint(disk_id, 1, 1),
        "domain": lambda: c._request("PUT", f"/v1/disks/{disk_id}/domain", json={"name": "vm01"}),
        "resume token": lambda: c.resume_token(disk_id, stream),
        "upload": lambda: c.send_stream(disk_id, stream, path, commit=False),
        "commit": lambda: c._request("POST", f"/v1/disks/{disk_id}/uploads/{stream}/commit"),
        "abort": lambda: c.abort(disk_id, stream),
        "DELETE disk": lambda: c.delete_disk(disk_id),
    }


def test_failover_fences_the_old_epoch_on_every_route(servers, pki, tmp_path):
    server = servers.cert()
    p = Primary()
    for n in (1, 2):
        assert cycle(server, pki, tmp_path, p, 3, n)["generation"] == n
    disk = disk_of(server, tmp_path, p)
    assert disk.state.epoch == 3 and image_bytes(disk) == bytes(p.data)

    # the replica site fails the machine over (the store's failover path, as replica_site.py calls it)
    disk.set_failover({"machine": "vm01", "point": 2, "time": 0.0, "path": "/nowhere"})
    assert disk.state.epoch == 4 and disk.state.failover["epoch"] == 4
    stream = uuid.uuid4().hex
    path = write(tmp_path, "next.delta", p.cycle())

    async def stale():
        out = {}
        async with client(server, pki, 3) as c:
            for what, call in every_route(c, p.disk_id, stream, path).items():
                with pytest.raises(Fenced) as e:
                    await call()
                out[what] = e.value
        return out
    refused = run(stale())
    for what, e in refused.items():
        assert (e.status, e.code, e.epoch, e.failed_over) == (409, "fenced", 4, True), what
        assert e.message == "fenced: the replica site failed machine vm01 over at epoch 4; the request's epoch is 3"
    assert server.counters["rejected_fenced"] == len(refused)
    assert disk.state.counters["rejected_fenced"] == len(refused)
    assert disk.generation == 2 and not disk.state.committed[-1][0] == stream      # nothing changed
    assert disk.state.epoch == 4

    # a primary without an epoch (standalone) is served as before: it reads, and the failed-over disk
    # refuses its cycle with the failover's own reason
    async def standalone():
        async with client(server, pki) as c:
            view = await c.state(p.disk_id)
            with pytest.raises(ReplicaRefused) as e:
                await c.ensure_disk(p.disk_id, p.size, machine="vm01")
            return view, e.value
    view, e = run(standalone())
    assert view["generation"] == 2 and view["failed_over"] and view["epoch"] == 4
    assert e.code == "sequence" and "failed over" in e.message and not isinstance(e, Fenced)

    # failing over again (another point) keeps the epoch; cancelling never lowers it
    disk.set_failover({"machine": "vm01", "point": 1, "time": 0.0, "path": "/nowhere"})
    assert disk.state.epoch == 4
    disk.set_failover(None)
    assert disk.state.epoch == 4 and disk.state.failover is None
    with pytest.raises(Fenced):
        cycle(server, pki, tmp_path, p, 3, 3, path)
    # the epoch the failover made is accepted: the primary that was given it replicates again
    assert cycle(server, pki, tmp_path, p, 4, 3, path)["generation"] == 3
    assert image_bytes(disk) == bytes(p.data)


def test_a_newer_epoch_is_adopted_and_the_older_one_refused(servers, pki, tmp_path):
    server = servers.cert()
    p = Primary(seed=5)
    cycle(server, pki, tmp_path, p, 2, 1)
    disk = disk_of(server, tmp_path, p)
    assert disk.state.epoch == 2
    cycle(server, pki, tmp_path, p, 7, 2)          # the controller moved the machine (over and back)
    assert disk.state.epoch == 7
    path = write(tmp_path, "third.delta", p.cycle())
    with pytest.raises(Fenced) as e:
        cycle(server, pki, tmp_path, p, 6, 3, path)
    assert e.value.epoch == 7 and not e.value.failed_over
    assert "a newer primary took it over" in e.value.message
    # a request without an epoch is not checked (standalone) and changes nothing
    assert cycle(server, pki, tmp_path, p, None, 3, path)["generation"] == 3
    assert disk.state.epoch == 7 and image_bytes(disk) == bytes(p.data)
    # the epoch survives the server: a new store object reads it from the state file
    assert ReplicaStore(str(tmp_path / "root")).disk(p.disk_id).state.epoch == 7


def test_fencing_stays_inside_the_trust_group(servers, pki, tmp_path, peer_factory):
    """A peer of another trust group can neither raise nor probe a disk's epoch: it is refused before."""
    from replicator.transport import AuthorizationEntry
    root = str(tmp_path / "root")
    server = servers.cert([AuthorizationEntry("primary1", root, "g1"), AuthorizationEntry("primary2", root, "g2")])
    p = Primary(seed=9)
    cycle(server, pki, tmp_path, p, 3, 1)
    other = peer_factory(server, "primary2")
    status, body = other.raw("GET", f"/v1/disks/{p.disk_id}", headers={"X-Replicator-Epoch": "99"})
    assert status == 403 and json.loads(body)["error"] == "forbidden"
    assert disk_of(server, tmp_path, p).state.epoch == 3


def test_old_state_files_without_an_epoch_load(servers, pki, tmp_path):
    server = servers.cert()
    p = Primary(seed=11)
    cycle(server, pki, tmp_path, p, None, 1)
    state_file = tmp_path / "root" / "disks" / str(p.disk_id) / "state.json"
    raw = json.loads(state_file.read_text())
    assert raw["epoch"] is None
    del raw["epoch"]                         # as a build from before fencing wrote it
    state_file.write_text(json.dumps(raw))
    disk = ReplicaStore(str(tmp_path / "root")).disk(p.disk_id)
    assert disk.state.epoch is None and disk.generation == 1
    servers.stop()
    server = servers.cert()                  # a new server reads the old file
    cycle(server, pki, tmp_path, p, 5, 2)
    assert disk_of(server, tmp_path, p).state.epoch == 5


BAD = ["abc", "-1", "+3", "1.5", "", "   ", "0x10", "1e3", "3 4", "3,4", "9223372036854775808",
       "99999999999999999999999999", "1" * 400, "٣", "\t7\t7"]


def test_fuzzed_epoch_headers_get_a_one_line_400(servers, pki, tmp_path, peer_factory):
    server = servers.cert()
    p = Primary(seed=13)
    cycle(server, pki, tmp_path, p, 3, 1)
    peer = peer_factory(server, "primary1")
    rng = random.Random(14)
    values = BAD + ["".join(rng.choice("0123456789-+ .eE_xX,;abc") for _ in range(rng.randrange(1, 30)))
                    for _ in range(40)]
    routes = [("PUT", f"/v1/disks/{p.disk_id}", {"json": {"size": p.size}}),
              ("GET", f"/v1/disks/{p.disk_id}", {}),
              ("GET", f"/v1/disks/{p.disk_id}/digests?block_size=65536", {}),
              ("GET", f"/v1/disks/{p.disk_id}/uploads/abcd", {}),
              ("POST", f"/v1/disks/{p.disk_id}/uploads/abcd/commit", {})]
    seen, highest = 0, 3
    for i, value in enumerate(values):
        method, path, kw = routes[i % len(routes)]
        try:
            ok = value.strip().isascii() and value.strip().isdigit() and int(value) < 1 << 63
        except ValueError:
            ok = False
        status, body = peer.raw(method, path, headers={"X-Replicator-Epoch": value.encode("utf-8").decode("latin-1")},
                                **kw)
        assert status != 500, (value, body)
        if ok:                                  # a valid epoch: adopted when newer, refused 409 when older
            assert status in (200, 404, 409), (value, body)
            highest = max(highest, int(value))
            continue
        seen += 1
        doc = json.loads(body)
        assert status == 400 and doc["error"] == "refused", (value, status, doc)
        assert doc["message"].startswith("X-Replicator-Epoch must be one integer") and "\n" not in doc["message"]
    assert seen > 30
    # two headers are refused too; the disk's epoch is the highest valid one it was sent
    status, body = peer.raw("GET", f"/v1/disks/{p.disk_id}",
                            headers=[("X-Replicator-Epoch", "3"), ("X-Replicator-Epoch", "4")])
    assert status == 400 and "\n" not in json.loads(body)["message"]
    assert disk_of(server, tmp_path, p).state.epoch == highest
