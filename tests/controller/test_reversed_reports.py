"""While a machine's direction is reversed (reverse replication after a committed failover), the recovery host
protects it: that host's report gives the machine its state, health, RPO, last success and history samples, and
the primary host (which holds the way back's replica) gives its recovery points. After the failback, the primary
host's report counts again. Every report, and every failover step, goes through the real host channel."""
from __future__ import annotations

import datetime as dt

from sqlalchemy import select

from replicator.controller import history as hi

from .helpers import ok
from .test_history import _age_samples, _as_host, _fleet


def _report(host, *machines: dict, points: dict | None = None, operations: dict | None = None) -> None:
    body = {"revision": 1, "status": {"machines": list(machines)}, "operations": operations or {}}
    if points is not None:
        body["points"] = points
    ok(host.post("/v1/hosts/self/report", json=body))


def _entry(state: str, rpo: float, last: float, health: str = "Normal") -> dict:
    return {"name": "vm01", "role": "primary", "state": state,
            "stats": {"health": health, "achieved_rpo": rpo, "pending_size": 0, "last_replication_time": last},
            "last_cycle": {"time": last, "kinds": ["delta"], "bytes_sent": 1 << 20, "seconds": 1.0}}


def _points(*numbers: int) -> dict:
    return {"vm01": [{"point": n, "time": 1_700_000_000.0 + n, "consistency": "crash", "generations": {"a" * 32: n}}
                     for n in numbers]}


def _step(host, job: dict, op: str, **more) -> None:
    """The host ran this step of the job (its agent's report of operations[vm01]["site"])."""
    _report(host, operations={"vm01": {"site": {"job": job["id"], "op": op, "state": "succeeded", **more}}})


def _machine(c) -> tuple:
    x = ok(c.get("/v1/machines/vm01"))
    return x["direction"], x["observed_state"], x["health"], x["rpo_seconds"]


def test_reversed_machine_is_observed_from_its_recovery_host(controller, tmp_path):
    c = controller.client
    hosts = _fleet(controller, tmp_path)
    pa1, rb1 = hosts["pa1"], hosts["rb1"]
    _report(pa1, _entry("Replicating", 42.0, 1_700_000_000.0))
    _report(rb1, points=_points(1, 2))
    assert _machine(c) == ("forward", "Replicating", "Normal", 42.0)
    assert [p["point"] for p in ok(c.get("/v1/machines/vm01/points"))["points"]] == [1, 2]
    # forward: the replica host's word on the machine's state is not taken
    _report(rb1, _entry("Replicating", 5.0, 1_700_000_500.0))
    assert _machine(c) == ("forward", "Replicating", "Normal", 42.0)

    # failed over (forced: pa1 reported a moment ago), committed, reversed -- each step reported by its host
    job = ok(c.post("/v1/machines/vm01/failover", json={"kind": "unplanned", "force": True}), 202)
    _step(rb1, job, "failover", point=2, epoch=2)
    _step(rb1, ok(c.post("/v1/machines/vm01/commit-failover"), 202), "commit-failover")
    rev = ok(c.post("/v1/machines/vm01/reverse"), 202)
    _step(pa1, rev, "accept-reverse")
    _step(rb1, rev, "reverse", epoch=2)
    assert _machine(c)[0] == "reversed"

    # reversed: pa1 no longer protects vm01 (what it says is ignored) but holds its replica (its points count);
    # rb1 protects it (its state, RPO, samples count) and its points report no longer replaces pa1's
    _report(pa1, _entry("FailedOver", 999.0, 1_700_000_100.0, health="Critical"), points=_points(7))
    assert _machine(c) == ("reversed", "Replicating", "Normal", 42.0)
    _age_samples(controller.store, hi.SAMPLE_EVERY)
    _report(rb1, _entry("Resynchronizing", 12.0, 1_700_000_900.0, health="Warning"), points={})
    assert _machine(c) == ("reversed", "Resynchronizing", "Warning", 12.0)
    x = ok(c.get("/v1/machines/vm01"))
    assert dt.datetime.fromisoformat(x["last_success_at"]).timestamp() == 1_700_000_900.0
    samples = ok(c.get("/v1/machines/vm01/history"))["samples"]
    assert [(s["rpo_seconds"], s["state"]) for s in samples] == [(42.0, "Replicating"), (12.0, "Resynchronizing")]
    points = ok(c.get("/v1/machines/vm01/points"))
    assert (points["host"], [p["point"] for p in points["points"]]) == ("pa1", [7])
    with controller.store.session() as s:                  # pa1's report wrote no sample of its own
        assert len(s.scalars(select(hi.RpoSample)).all()) == 2

    # failed back: pa1 protects vm01 again and rb1 holds its replica
    fb = ok(c.post("/v1/machines/vm01/failback"), 202)
    for host, op in ((rb1, "planned-failover"), (pa1, "failover"), (rb1, "accept-reverse"), (pa1, "reverse")):
        _step(host, fb, op)
    assert _machine(c)[0] == "forward"
    _report(rb1, _entry("Replicating", 3.0, 1_700_001_000.0), points=_points(8))
    assert _machine(c) == ("forward", "Resynchronizing", "Warning", 12.0)
    _report(pa1, _entry("Replicating", 20.0, 1_700_001_200.0), points={})
    assert _machine(c) == ("forward", "Replicating", "Normal", 20.0)
    points = ok(c.get("/v1/machines/vm01/points"))
    assert (points["host"], [p["point"] for p in points["points"]]) == ("rb1", [8])


def test_observed_sides_follow_the_direction(controller, tmp_path):
    """GET /v1/observed/machines: while reversed, "primary" is the recovery host's entry (it protects the machine)
    and "replica" the primary host's."""
    c = controller.client
    hosts = _fleet(controller, tmp_path)
    pa1, rb1 = hosts["pa1"], hosts["rb1"]
    _report(pa1, _entry("Replicating", 42.0, 1_700_000_000.0))
    [o] = ok(c.get("/v1/observed/machines", params={"machine": "vm01"}))
    assert (o["primary"]["host"], o["replica"]) == ("pa1", None)
    job = ok(c.post("/v1/machines/vm01/failover", json={"kind": "unplanned", "force": True}), 202)
    _step(rb1, job, "failover", point=2, epoch=2)
    _step(rb1, ok(c.post("/v1/machines/vm01/commit-failover"), 202), "commit-failover")
    rev = ok(c.post("/v1/machines/vm01/reverse"), 202)
    _step(pa1, rev, "accept-reverse")
    _step(rb1, rev, "reverse", epoch=2)
    _report(rb1, _entry("Replicating", 12.0, 1_700_000_900.0))
    _report(pa1, _entry("FailedOver", 999.0, 1_700_000_100.0))
    [o] = ok(c.get("/v1/observed/machines", params={"machine": "vm01"}))
    assert (o["primary"]["host"], o["primary"]["entry"]["stats"]["achieved_rpo"]) == ("rb1", 12.0)
    assert (o["replica"]["host"], o["replica"]["entry"]["state"]) == ("pa1", "FailedOver")
