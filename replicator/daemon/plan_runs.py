"""Recovery plans ([[plan]] in replicatord.toml) run by the replica site: a PlanRun (orchestration/plans.py)
whose member operation is the site's test, planned or unplanned failover, in the background, as a job.

Admin API:
  GET  /v1/plans                        the plans and their last run
  GET  /v1/plans/NAME                   the plan, its last run: state, members, pending confirmations, log
  POST /v1/plans/NAME/test|planned|unplanned   start a run (409 while one runs)
  POST /v1/plans/NAME/confirm           {"action": ID, "ok": true}: an operator confirms (or declines) a
                                        manual action the run waits for
  POST /v1/plans/NAME/cleanup           clean up the test failovers of the plan's members
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from aiohttp import web

from ..errors import ReplicatorError
from ..orchestration.plans import KINDS, PlanError, PlanResult, PlanRun
from ..orchestration.states import StateError

log = logging.getLogger("replicatord")


@dataclass
class Run:
    run: PlanRun
    job: object
    task: asyncio.Task
    result: PlanResult | None = None

    @property
    def running(self) -> bool:
        return not self.task.done()

    def view(self) -> dict:
        r, result = self.run, self.result
        t = self.task
        if result is None and t.done() and not t.cancelled() and t.exception() is None:
            result = t.result()                 # ended; its done-callback (which keeps the result) runs next
        state = "running" if self.running else "succeeded" if result and result.ok else "failed"
        return {"kind": r.kind, "job": self.job.id, "state": state, "members": dict(r.members),
                "pending": r.pending_confirmations(), "log": list(r.log),
                "failed_group": result.failed_group if result else None,
                "error": result.error if result else None}


class PlanRunner:
    def __init__(self, site, plans: dict, jobs):
        self.site, self.plans, self.jobs = site, plans, jobs
        self.runs: dict[str, Run] = {}

    def _plan(self, name: str):
        from .replica_site import NotFound
        if name not in self.plans:
            raise NotFound(f"no recovery plan {name!r} (plans: {', '.join(self.plans) or 'none'})")
        return self.plans[name]

    def view(self, name: str) -> dict:
        plan = self._plan(name)
        run = self.runs.get(name)
        return {"name": name, "groups": [{"members": g.members, "pre": [a.describe() for a in g.pre],
                                          "post": [a.describe() for a in g.post]} for g in plan.groups],
                "run": run.view() if run else None}

    # ------------------------------------------------------------------ running
    def start(self, name: str, kind: str) -> dict:
        plan = self._plan(name)
        if kind not in KINDS:
            raise PlanError(f"failover kind must be one of {', '.join(KINDS)}, not {kind!r}")
        if name in self.runs and self.runs[name].running:
            raise StateError(f"recovery plan {name!r} is already running ({self.runs[name].job.id})")
        held = self.site.machines()
        missing = [m for m in plan.members if m not in held]
        if missing:
            raise StateError(f"recovery plan {name!r} names machines this replica site does not hold: "
                             f"{', '.join(missing)}")
        job = self.jobs.create("recovery-plan", name)
        run = PlanRun(plan, kind, self._operation, job=job, env=self.site.failover_ip_env(plan.members))
        task = asyncio.create_task(run.run(), name=f"plan-{name}")
        entry = self.runs[name] = Run(run, job, task)
        task.add_done_callback(lambda t: self._ended(name, entry, t))
        return self.view(name)

    def _ended(self, name: str, entry: Run, task: asyncio.Task) -> None:
        if task.cancelled():
            with contextlib.suppress(ReplicatorError):
                entry.job.fail("cancelled: the daemon stopped")
            return
        if task.exception() is not None:            # a bug in the run itself: keep a trace, end the job
            log.error("recovery plan %s: %r", name, task.exception())
            with contextlib.suppress(ReplicatorError):
                entry.job.fail(task.exception())
            return
        entry.result = task.result()

    async def _operation(self, member: str, kind: str) -> str | None:
        """The member's failover; returns once its domain (when one was booted) runs and its guest agent
        answered guest-ping, so the next group starts after this one is up."""
        if kind == "test":
            await self.site.test_failover(member)
        else:
            await self.site.failover(member, planned=kind == "planned")
        return await self.site.booted(member)

    def confirm(self, name: str, action: str, ok: bool) -> dict:
        self._plan(name)
        run = self.runs.get(name)
        if run is None or not run.running:
            raise StateError(f"recovery plan {name!r} is not running")
        run.run.confirm(action, ok=ok)
        return self.view(name)

    async def cleanup(self, name: str) -> dict:
        """Clean up the test failovers a test run of the plan left (members without one are skipped)."""
        plan = self._plan(name)
        if name in self.runs and self.runs[name].running:
            raise StateError(f"recovery plan {name!r} is running: wait for it to end")
        done = []
        for member in plan.members:
            with contextlib.suppress(StateError):
                await self.site.cleanup_test_failover(member)
                done.append(member)
        return {**self.view(name), "cleaned_up": done}

    async def stop(self) -> None:
        tasks = [r.task for r in self.runs.values() if r.running]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------ admin API
    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/plans", self._list)
        app.router.add_get("/v1/plans/{name}", self._get)
        app.router.add_post("/v1/plans/{name}/{op}", self._operation_route)

    async def _list(self, request):
        return web.json_response({"plans": [self.view(n) for n in self.plans]})

    async def _get(self, request):
        from .replica_site import answer

        async def get():
            return self.view(request.match_info["name"])
        return await answer(get)

    async def _operation_route(self, request):
        from .replica_site import NotFound, answer, json_body
        name, op = request.match_info["name"], request.match_info["op"]

        async def run():
            body = await json_body(request)
            if op in KINDS:
                return self.start(name, op)
            if op == "confirm":
                if not isinstance(body.get("action"), str):
                    raise PlanError("confirm needs {\"action\": ID} (the id the plan's log shows, e.g. g1.post1)")
                return self.confirm(name, body["action"], bool(body.get("ok", True)))
            if op == "cleanup":
                return await self.cleanup(name)
            raise NotFound(f"unknown plan operation {op!r} (known: {', '.join(KINDS)}, confirm, cleanup)")
        return await answer(run)
