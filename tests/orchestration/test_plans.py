"""Recovery plans: group order, members in parallel, scripts and manual confirmations, a failing member
stopping later groups, and the job log."""
from __future__ import annotations

import asyncio
import time

import pytest

from replicator.orchestration.jobs import JobRegistry
from replicator.orchestration.plans import (ManualAction, PlanError, PlanGroup, PlanRun, RecoveryPlan,
                                            ScriptAction)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


class Operation:
    """Records start and end of each member; members listed in `fail` raise."""

    def __init__(self, delay=0.05, fail=()):
        self.delay, self.fail = delay, set(fail)
        self.events: list[tuple[str, str]] = []
        self.active = self.max_active = 0

    async def __call__(self, member, kind):
        self.events.append(("start", member))
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await asyncio.sleep(self.delay)
            if member in self.fail:
                raise RuntimeError(f"no recovery point for {member}")
        finally:
            self.active -= 1
            self.events.append(("end", member))


def texts(log):
    return [e["text"] for e in log]


def test_groups_in_order_members_in_parallel(tmp_path):
    plan = RecoveryPlan("site", [PlanGroup(["db1", "db2"]), PlanGroup(["app1", "app2", "app3"]),
                                 PlanGroup(["web"])])
    op = Operation()
    start = time.monotonic()
    result = run(PlanRun(plan, "planned", op).run())
    elapsed = time.monotonic() - start
    assert result.ok and result.members == dict.fromkeys(plan.members, "ok")
    order = [m for what, m in op.events if what == "start"]
    assert set(order[:2]) == {"db1", "db2"} and set(order[2:5]) == {"app1", "app2", "app3"} and order[5] == "web"
    ends = [m for what, m in op.events if what == "end"]
    assert op.events.index(("start", "app1")) > max(op.events.index(("end", m)) for m in ("db1", "db2"))
    assert op.max_active == 3 and elapsed < 3 * 0.05 + 1 and len(ends) == 6
    assert texts(result.log)[0] == "planned failover of plan 'site' started (3 groups)"
    assert "group 2: started (app1, app2, app3)" in texts(result.log)


def test_failing_member_fails_the_plan_at_the_end_of_its_group():
    plan = RecoveryPlan("site", [PlanGroup(["db1"]), PlanGroup(["app1", "app2"], post=[ScriptAction("true")]),
                                 PlanGroup(["web"], pre=[ScriptAction("true")])])
    op = Operation(fail={"app1"}, delay=0.02)
    result = run(PlanRun(plan, "unplanned", op).run())
    assert not result.ok and result.failed_group == 2
    assert result.members == {"db1": "ok", "app1": "failed: no recovery point for app1", "app2": "ok",
                              "web": "not started"}
    assert ("end", "app2") in op.events and ("start", "web") not in op.events
    log = texts(result.log)
    assert "app1: failed: no recovery point for app1" in log
    assert "group 2: post-actions skipped" in log
    assert "group 2: failed (member app1 failed); later groups not started" in log
    assert log[-1] == "plan 'site' failed" and result.error == "member app1 failed"
    assert not any("g3" in t for t in log)


def test_scripts_run_with_output_logged_and_a_failing_pre_action_stops_the_group(tmp_path):
    marker = tmp_path / "env"
    plan = RecoveryPlan("site", [
        PlanGroup(["db1"], pre=[ScriptAction(["sh", "-c", f"echo $REPLICATOR_FAILOVER $REPLICATOR_ACTION > {marker};"
                                              " echo started dns"])],
                  post=[ScriptAction(["sh", "-c", "echo nope; exit 4"])]),
        PlanGroup(["web"])])
    result = run(PlanRun(plan, "test", Operation()).run())
    assert marker.read_text().split() == ["test", "g1.pre1"]
    log = texts(result.log)
    assert "g1.pre1: ok: started dns" in log and "g1.post1: failed: exited with 4: nope" in log
    assert not result.ok and result.failed_group == 1 and result.members["web"] == "not started"

    plan = RecoveryPlan("p", [PlanGroup(["a"], pre=[ScriptAction("sleep 30", timeout=0.2)])])
    result = run(PlanRun(plan, "test", Operation()).run())
    assert result.members == {"a": "not started"} and "g1.pre1: failed: timed out after 0.2 s" in texts(result.log)
    assert "group 1: members not started" in texts(result.log)


def test_actions_limited_to_kinds():
    plan = RecoveryPlan("p", [PlanGroup(["a"], pre=[ScriptAction("false", kinds=("planned",))])])
    assert run(PlanRun(plan, "test", Operation()).run()).ok
    assert not run(PlanRun(plan, "planned", Operation()).run()).ok


def test_manual_action_waits_for_the_operator():
    plan = RecoveryPlan("p", [PlanGroup(["db"]), PlanGroup(["web"], pre=[ManualAction("switch the DNS record")])])

    async def main():
        op = Operation(delay=0.01)
        pr = PlanRun(plan, "planned", op)
        task = asyncio.create_task(pr.run())
        while not pr.pending_confirmations():
            await asyncio.sleep(0.01)
        assert pr.pending_confirmations() == [{"id": "g2.pre1", "text": "switch the DNS record"}]
        await asyncio.sleep(0.05)
        assert ("start", "web") not in op.events and not task.done()
        with pytest.raises(PlanError, match="no manual action 'g9.pre1'"):
            pr.confirm("g9.pre1")
        pr.confirm("g2.pre1", by="alice")
        result = await task
        assert pr.pending_confirmations() == []
        return result

    result = run(main())
    assert result.ok and "g2.pre1: ok: confirmed by alice" in texts(result.log)


def test_manual_action_declined_or_timed_out():
    async def main(decline):
        plan = RecoveryPlan("p", [PlanGroup(["web"], pre=[ManualAction("check the firewall", timeout=0.2)])])
        pr = PlanRun(plan, "unplanned", Operation())
        task = asyncio.create_task(pr.run())
        if decline:
            while not pr.pending_confirmations():
                await asyncio.sleep(0.01)
            pr.confirm("g1.pre1", ok=False, by="bob")
        return await task

    declined, timed_out = run(main(True)), run(main(False))
    assert not declined.ok and "g1.pre1: failed: declined by bob" in texts(declined.log)
    assert not timed_out.ok and "g1.pre1: failed: not confirmed within 0.2 s" in texts(timed_out.log)


def test_plan_validation():
    with pytest.raises(PlanError, match="at most 7"):
        RecoveryPlan("p", [PlanGroup([f"m{i}"]) for i in range(8)])
    assert len(RecoveryPlan("p", [PlanGroup([f"m{i}"]) for i in range(7)]).groups) == 7
    with pytest.raises(PlanError, match="'a' is in group 1 and group 2"):
        RecoveryPlan("p", [PlanGroup(["a"]), PlanGroup(["a"])])
    with pytest.raises(PlanError, match="no groups"):
        RecoveryPlan("p", [])
    with pytest.raises(PlanError, match="failover kind"):
        PlanRun(RecoveryPlan("p", [PlanGroup(["a"])]), "sideways", Operation())


def test_plan_run_logs_into_a_job(tmp_path):
    jobs = JobRegistry(str(tmp_path))
    job = jobs.create("recovery-plan", "site")
    plan = RecoveryPlan("site", [PlanGroup(["a", "b"])])
    result = run(PlanRun(plan, "test", Operation(fail={"b"}), job=job).run())
    assert not result.ok and job.state.value == "failed" and job.error == "member b failed"
    assert [e["text"] for e in job.log][1:4] == ["test failover of plan 'site' started (1 group)",
                                                  "group 1: started (a, b)", "a: test failover started"]
    assert all(e["time"] for e in job.log)
    assert JobRegistry(str(tmp_path)).summaries()[0]["state"] == "failed"
