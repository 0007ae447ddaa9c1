"""Recovery plans (as in Azure Site Recovery): machines in ordered groups, up to 7, failed over group by
group -- members of a group in parallel -- with pre- and post-actions per group: scripts, and manual
steps that wait for an operator to confirm them through the API.

The same plan serves test, planned and unplanned failover: the per-member operation is injected
(`operation(member, kind)`, which returns when the member's machine is up: the replica site waits until its
domain runs and answers guest-ping), so the plan only orders, waits and logs. A member that fails lets the rest of
its group finish, then stops the plan: no later group starts and the group's post-actions are skipped,
because they assume its machines are up. Every step goes to the run's log (and to a Job when one is given).
"""
from __future__ import annotations

import asyncio
import shlex
import time
from dataclasses import dataclass, field

from ..errors import ReplicatorError, UsageError
from .scripts import argv_of, run_script

MAX_GROUPS = 7
KINDS = ("test", "planned", "unplanned")


class PlanError(UsageError):
    """A recovery plan that cannot be run as defined."""


class ActionFailed(ReplicatorError):
    """A pre- or post-action failed, timed out, or was declined by the operator."""


@dataclass
class ScriptAction:
    cmd: str | list
    timeout: float = 300.0
    kinds: tuple[str, ...] | None = None        # None: every kind of failover

    def describe(self) -> str:
        return f"script {self.cmd if isinstance(self.cmd, str) else shlex.join(self.cmd)}"

    async def run(self, plan_run: "PlanRun", action_id: str) -> str:
        env = {**plan_run.env, "REPLICATOR_PLAN": plan_run.plan.name, "REPLICATOR_FAILOVER": plan_run.kind,
               "REPLICATOR_ACTION": action_id}
        try:
            code, text = await run_script(self.cmd, env, self.timeout)
        except asyncio.TimeoutError:            # first: TimeoutError is an OSError
            raise ActionFailed(f"timed out after {self.timeout:g} s") from None
        except OSError as e:
            raise ActionFailed(f"cannot run {argv_of(self.cmd)[0]!r}: {e.strerror or e}") from None
        if code != 0:
            raise ActionFailed(f"exited with {code}" + (f": {text[-300:]}" if text else ""))
        return text


@dataclass
class ManualAction:
    text: str
    timeout: float | None = None                # None: wait as long as it takes
    kinds: tuple[str, ...] | None = None

    def describe(self) -> str:
        return f"manual: {self.text}"

    async def run(self, plan_run: "PlanRun", action_id: str) -> str:
        return await plan_run._wait_confirmation(action_id, self)


@dataclass
class PlanGroup:
    members: list[str] = field(default_factory=list)
    pre: list = field(default_factory=list)
    post: list = field(default_factory=list)


@dataclass
class RecoveryPlan:
    name: str
    groups: list[PlanGroup]

    def __post_init__(self):
        if not self.groups:
            raise PlanError(f"recovery plan {self.name!r} has no groups")
        if len(self.groups) > MAX_GROUPS:
            raise PlanError(f"recovery plan {self.name!r} has {len(self.groups)} groups; at most {MAX_GROUPS}")
        seen: dict[str, int] = {}
        for k, g in enumerate(self.groups, 1):
            for m in g.members:
                if m in seen:
                    raise PlanError(f"recovery plan {self.name!r}: {m!r} is in group {seen[m]} and group {k}")
                seen[m] = k

    @property
    def members(self) -> list[str]:
        return [m for g in self.groups for m in g.members]


@dataclass
class PlanResult:
    ok: bool
    kind: str
    members: dict[str, str]                     # member -> "ok", "failed: ...", "not started"
    failed_group: int | None = None
    error: str | None = None
    log: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "kind": self.kind, "members": dict(self.members),
                "failed_group": self.failed_group, "error": self.error, "log": list(self.log)}


class PlanRun:
    """One execution of a plan. `confirm(action_id)` releases a waiting manual action."""

    def __init__(self, plan: RecoveryPlan, kind: str, operation, *, job=None, clock=time.time,
                 env: dict[str, str] | None = None):
        if kind not in KINDS:
            raise PlanError(f"failover kind must be one of {', '.join(KINDS)}, not {kind!r}")
        self.plan, self.kind, self.operation, self.job, self.clock = plan, kind, operation, job, clock
        self.env = dict(env or {})              # given to every script action (e.g. REPLICATOR_IP_<MACHINE>_NET0)
        self.log: list[dict] = []
        self.members = dict.fromkeys(plan.members, "not started")
        self._waiting: dict[str, tuple[ManualAction, asyncio.Event, list]] = {}

    # ------------------------------------------------------------------ operator
    def pending_confirmations(self) -> list[dict]:
        return [{"id": aid, "text": a.text} for aid, (a, ev, _) in self._waiting.items() if not ev.is_set()]

    def confirm(self, action_id: str, ok: bool = True, by: str = "operator") -> None:
        if action_id not in self._waiting or self._waiting[action_id][1].is_set():
            raise PlanError(f"no manual action {action_id!r} is waiting for confirmation")
        _, event, decision = self._waiting[action_id]
        decision.append((ok, by))
        event.set()

    async def _wait_confirmation(self, action_id: str, action: ManualAction) -> str:
        event, decision = asyncio.Event(), []
        self._waiting[action_id] = (action, event, decision)
        self._note(f"{action_id}: waiting for confirmation: {action.text}", action=action_id)
        try:
            await asyncio.wait_for(event.wait(), action.timeout)
        except asyncio.TimeoutError:
            raise ActionFailed(f"not confirmed within {action.timeout:g} s") from None
        finally:
            event.set()
        ok, by = decision[0]
        if not ok:
            raise ActionFailed(f"declined by {by}")
        return f"confirmed by {by}"

    # ------------------------------------------------------------------ running
    async def run(self) -> PlanResult:
        self._note(f"{self.kind} failover of plan {self.plan.name!r} started ({len(self.plan.groups)} group{'s' if len(self.plan.groups) != 1 else ''})")
        failed_group, error = None, None
        for k, group in enumerate(self.plan.groups, 1):
            self._note(f"group {k}: started ({', '.join(group.members) or 'no members'})", group=k)
            error = await self._actions(k, "pre", group.pre)
            if error is None:
                error = await self._members(k, group)
                error = error or await self._actions(k, "post", group.post)
            elif group.members:
                self._note(f"group {k}: members not started", group=k)
            if error is not None:
                failed_group = k
                self._note(f"group {k}: failed ({error}); later groups not started", "error", group=k)
                break
            self._note(f"group {k}: done", group=k)
        ok = failed_group is None
        self._note(f"plan {self.plan.name!r} {'succeeded' if ok else 'failed'}", "info" if ok else "error")
        if self.job is not None and ok:
            self.job.succeed()
        elif self.job is not None:
            self.job.fail(error)
        return PlanResult(ok, self.kind, dict(self.members), failed_group, error, list(self.log))

    async def _actions(self, k: int, phase: str, actions: list) -> str | None:
        for i, action in enumerate(actions, 1):
            if action.kinds is not None and self.kind not in action.kinds:
                continue
            aid = f"g{k}.{phase}{i}"
            self._note(f"{aid}: {action.describe()}", group=k, action=aid)
            try:
                out = await action.run(self, aid)
            except ActionFailed as e:
                self._note(f"{aid}: failed: {e}", "error", group=k, action=aid)
                return f"{phase}-action {aid} failed: {e}"
            self._note(f"{aid}: ok" + (f": {out}" if out else ""), group=k, action=aid)
        return None

    async def _members(self, k: int, group: PlanGroup) -> str | None:
        results = await asyncio.gather(*(self._member(k, m) for m in group.members))
        failed = [m for m, ok in zip(group.members, results) if not ok]
        if failed:
            if group.post:
                self._note(f"group {k}: post-actions skipped", "error", group=k)
            return f"member{'s' if len(failed) > 1 else ''} {', '.join(failed)} failed"
        return None

    async def _member(self, k: int, member: str) -> bool:
        self.members[member] = "running"
        self._note(f"{member}: {self.kind} failover started", group=k, member=member)
        try:
            done = await self.operation(member, self.kind)
        except Exception as e:      # one member's failure is reported; its group's others go on
            self.members[member] = f"failed: {e}"
            self._note(f"{member}: failed: {e}", "error", group=k, member=member)
            return False
        self.members[member] = "ok"
        self._note(f"{member}: ok" + (f": {done}" if isinstance(done, str) and done else ""), group=k, member=member)
        return True

    def _note(self, text: str, level: str = "info", **fields) -> None:
        entry = {"time": self.clock(), "level": level, "text": text, **fields}
        self.log.append(entry)
        if self.job is not None:
            self.job.note(text, level)
