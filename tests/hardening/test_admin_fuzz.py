"""A bounded fuzzing pass over replicatord's admin API as a careless operator or a local intruder would
use it: random methods, paths built from the API's own words and from garbage, queries, bodies and headers,
with and without the admin token, against a real replicatord (both roles: machine vm01 replicates over
mutual TLS into the daemon's own replica listener, so the replica site holds a machine with recovery
points, and a recovery plan waits on a manual step). No answer is a 500; every error is a one-line JSON
object; the daemon logs no traceback and stays up; a refused request changes no machine's state."""
from __future__ import annotations

import json
import random
import signal
import time

import aiohttp
from hypothesis import HealthCheck, given, settings, strategies as st

from ..daemon.primary_harness import Daemon, config_text, free_port
from .conftest import run
from .test_configured_limits import _replica_table

MACHINE_OPS = ["pause", "resume", "resync", "cycle", "planned-failover"]
REPLICA_OPS = ["test-failover", "cleanup-test-failover", "failover", "commit-failover", "cancel-failover",
               "reverse", "accept-reverse"]
PLAN_OPS = ["test", "planned", "unplanned", "confirm", "cleanup"]
OTHER = ["vm01@x", "vm02", "job-99999", "..", "%2e%2e", "%00", "%ff", "a" * 300, "", "x", "status", "reload"]
ROUTES = [("/v1/status", [], []), ("/metrics", [], []), ("/v1/jobs", [], []), ("/v1/reload", [], []),
          ("/v1/jobs/{n}", ["job-00001", "job-00002"], []), ("/v1/machines/{n}/{op}", ["vm01"], MACHINE_OPS),
          ("/v1/replica/machines", [], []), ("/v1/replica/machines/{n}", ["vm01"], []),
          ("/v1/replica/machines/{n}/{op}", ["vm01"], REPLICA_OPS), ("/v1/plans", [], []),
          ("/v1/plans/{n}", ["p1"], []), ("/v1/plans/{n}/{op}", ["p1"], PLAN_OPS)]
WORDS = sorted({w for _, names, ops in ROUTES for w in names + ops} | set(OTHER))
GARBAGE = st.text(alphabet="abcdef-_.%0123456789/~@", max_size=20)


def path_of(rnd: random.Random, garbage: str) -> str:
    """Mostly the API's routes with their own names and operations, sometimes another's or garbage. The
    structure is picked by a plain seeded random (hypothesis's choices favour the first of each list and
    repeat themselves), the garbage by hypothesis."""
    def part(words):
        roll = rnd.random()
        return garbage if roll < 0.1 else rnd.choice(OTHER) if roll < 0.25 or not words else rnd.choice(words)
    if rnd.random() < 0.1:
        return "/" + "/".join(part(WORDS) for _ in range(rnd.randint(1, 5)))
    template, names, ops = rnd.choice(ROUTES)
    return template.format(n=part(names), op=part(ops))


METHODS = ["GET", "GET", "POST", "POST", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
JSONS = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.text(max_size=20),
                               st.floats(allow_nan=False)),
                     lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
                         st.sampled_from(["point", "planned", "from", "force", "action", "ok", "target", "cert",
                                          "full_copy", "frequency", "additional_points"]), kids, max_size=4),
                     max_leaves=10)
BODIES = st.one_of(st.none(), JSONS.map(lambda v: json.dumps(v).encode()), st.binary(max_size=200))
QUERIES = st.dictionaries(st.sampled_from(["wait", "machine", "state", "point", "x"]),
                          st.text(alphabet="01abcxyz-_%&= ", max_size=12), max_size=3)
HEADER_VALUES = st.text(alphabet="".join(chr(c) for c in range(32, 256) if c != 127), max_size=40)


def test_random_admin_requests(pki, tmp_path):
    listener = free_port()
    primary = pki.pair("primary1")
    machine_keys = f'cert = "{primary["cert"]}"\nkey = "{primary["key"]}"\nca = "{primary["ca"]}"\n'
    replica = _replica_table(pki, str(tmp_path / "replica-root"), listener, "") + f'''
[[plan]]
name = "p1"
[[plan.group]]
pre = [{{ manual = "Is the network ready?" }}]
'''
    d = Daemon(tmp_path, machine_keys + replica, disks=(("d0.vhdx", 8),))
    with open(d.config, "w") as f:       # vm01 replicates into this daemon's own replica listener
        f.write(config_text(tmp_path, machine_keys + replica, d.disk_names, d.port,
                            target=f"https://localhost:{listener}"))
    d.start(until="Replicating", timeout=60)
    token = open(tmp_path / "state" / "admin.token").read().strip()
    base = f"http://127.0.0.1:{d.port}"
    stats = {"requests": 0, "refused": 0, "statuses": set()}

    async def request(method, path, query=None, body=None, headers=None):
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
            async with s.request(method, base + path, params=query, data=body, headers=headers or {},
                                 skip_auto_headers=["Content-Type"] if body is None else ()) as r:
                return r.status, r.headers.get("Content-Type", ""), await r.read()

    def snapshot() -> dict | None:
        """What a refused request must not change; None while a job runs (its end changes states)."""
        auth = {"Authorization": f"Bearer {token}"}
        views = {}
        for path in ("/v1/status", "/v1/replica/machines", "/v1/plans", "/v1/jobs"):
            status, _, raw = run(request("GET", path, headers=auth))
            assert status == 200, (path, status, raw)
            views[path] = json.loads(raw)
        if any(j.get("state") == "running" for j in views["/v1/jobs"]["jobs"]):
            return None
        return {"primary": sorted((m["name"], m["state"], m.get("paused")) for m in views["/v1/status"]["machines"]),
                "replica": sorted((m["name"], m["state"], json.dumps(m.get("points"))) for m in
                                  views["/v1/replica/machines"]["machines"]),
                "plans": json.dumps(views["/v1/plans"], sort_keys=True),
                "jobs": len(views["/v1/jobs"]["jobs"])}

    deadline = time.monotonic() + 40

    rnd = random.Random(18)

    @settings(max_examples=2500, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(GARBAGE, QUERIES, BODIES,
           st.dictionaries(st.sampled_from(["Authorization", "Content-Type", "X-Anything", "Accept"]),
                           HEADER_VALUES, max_size=2))
    def one(garbage, query, body, headers):
        if time.monotonic() > deadline:
            return
        method, path, with_token = rnd.choice(METHODS), path_of(rnd, garbage), rnd.random() < 0.8
        headers = dict(headers)
        if with_token:
            headers["Authorization"] = f"Bearer {token}"
        if "reload" in path:
            headers.pop("Authorization", None)      # an accepted reload restarts the daemon's parts: not here
        before = snapshot()
        status, ctype, raw = run(request(method, path, query, body, headers))
        stats["requests"] += 1
        stats["statuses"].add(status)
        assert status < 500, (method, path, query, body, headers, status, raw)
        assert d.proc.poll() is None, d.daemon_log()
        if status >= 400 and method != "HEAD":
            stats["refused"] += 1
            assert ctype.startswith("application/json"), (method, path, status, ctype, raw)
            answer = json.loads(raw)
            assert isinstance(answer, dict) and isinstance(answer.get("error"), str), raw
            assert "\n" not in answer["error"] and "Traceback" not in answer["error"], answer
            after = snapshot()
            if before is not None and after is not None:
                assert after == before, (method, path, query, body, status, raw)
    try:
        one()
        assert stats["requests"] >= 300 and stats["refused"] >= 100, stats
        assert {200, 401, 404, 405, 409} <= stats["statuses"], stats     # accepted and refused of each kind
        assert d.proc.poll() is None
        log = d.daemon_log()
        assert "Traceback" not in log and "Error handling request" not in log, log
    finally:
        d.proc.send_signal(signal.SIGTERM)
        d.proc.wait(60)
