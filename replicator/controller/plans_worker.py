"""The recovery-plan worker (issue 14 item 6): a thread of the controller process that claims `plan-run` jobs
(jobs with no host: a controller's work, jobs.claim) and runs each plan group by group through the machines'
hosts. Each group: its pre-actions, then a failover of each member (controller/failover.py: a job per machine,
planned ones drive the primary first, then the replica side), waiting until all of them ended, then its
post-actions. A manual action puts the run in waiting_for_input until it is confirmed through the API
(POST /v1/plan-runs/ID/confirm); a script action runs its argv on the controller's host under its timeout.
A failed member or action fails the run (later groups are not started); a cancel asked of the job stops it
between steps. The lease is renewed at every poll, so another controller on the same database takes the run
over only if this one stopped renewing; it goes on from the group the run was in (failovers this run asked
are followed, not asked again; confirmed manual actions are not asked again; that group's script actions run
again)."""
from __future__ import annotations

import datetime as dt
import logging
import os
import secrets
import socket
import subprocess
import threading

from fastapi import HTTPException
from sqlalchemy import select

from . import failover, jobs
from . import models as m
from .db import Store

log = logging.getLogger("replicator.controller")
POLL = 0.5


class RunFailed(Exception):
    """The run ends (failed, or cancelled when `cancelled`) with this one-line reason."""

    def __init__(self, why: str, cancelled: bool = False):
        super().__init__(why)
        self.why, self.cancelled = why, cancelled


class Stopped(Exception):
    """The controller stops: the run is left under its lease, which lapses; a controller takes it up again."""


class PlanWorker:
    def __init__(self, store: Store, poll: float = POLL, lease: dt.timedelta = jobs.DEFAULT_LEASE):
        self.store, self.poll, self.lease = store, poll, lease
        self.name = f"controller:{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="plan-worker", daemon=True)

    def start(self) -> "PlanWorker":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.wait(self.poll):
            try:
                job = jobs.claim(self.store, self.name, kinds=["plan-run"], lease=self.lease)
                if job is not None:
                    self.run(job.id, job.plan_run_id)
            except Exception:             # the database away: logged, tried again at the next poll
                log.exception("plan worker")

    # ------------------------------------------------------------------ one run
    def run(self, job_id: int, run_id: int | None) -> None:
        try:
            if run_id is None:
                raise RunFailed("the job names no plan run")
            for position, group_id in self._groups(job_id, run_id):
                self._group(job_id, run_id, position, group_id)
        except RunFailed as e:
            self._end(job_id, run_id, "cancelled" if e.cancelled else "failed", e.why)
            return
        except Stopped:
            return
        self._end(job_id, run_id, "succeeded", "every group done")

    def _groups(self, job_id: int, run_id: int) -> list[tuple[int, int]]:
        with self.store.session() as s:
            run = s.get(m.PlanRun, run_id, with_for_update=True)
            if run is None:
                raise RunFailed(f"plan run {run_id} is gone")
            run.state = "running"
            if run.current_group:          # taken over from a worker that stopped: on from the group it was in
                jobs.log(s, job_id, f"resumed at group {run.current_group} by {self.name}")
            return [(g.position, g.id) for g in run.plan.groups if g.position >= run.current_group]

    def _group(self, job_id: int, run_id: int, position: int, group_id: int) -> None:
        with self.store.session() as s:
            run = s.get(m.PlanRun, run_id)
            run.current_group, kind = position, run.kind
            group = s.get(m.PlanGroup, group_id)
            actions = [(a.id, a.phase, a.action_kind) for a in group.actions if not a.kinds or kind in a.kinds]
            members = [p.machine_id for p in group.members]
            jobs.log(s, job_id, f"group {position}: {len(members)} machine(s)")
        for action_id, phase, action_kind in actions:
            if phase == "pre":
                self._action(job_id, run_id, action_id, action_kind)
        self._failovers(job_id, run_id, position, members)
        for action_id, phase, action_kind in actions:
            if phase == "post":
                self._action(job_id, run_id, action_id, action_kind)

    def _failovers(self, job_id: int, run_id: int, position: int, machine_ids: list[int]) -> None:
        children = []
        with self.store.session() as s:
            run = s.get(m.PlanRun, run_id)
            earlier = {j.machine_id: j for j in s.scalars(select(m.Job).where(
                m.Job.plan_run_id == run_id, m.Job.kind == "failover", m.Job.machine_id.in_(machine_ids),
                m.Job.state.in_(("queued", "running", "succeeded"))))}
            for machine_id in sorted(machine_ids):
                if machine_id in earlier:          # this run asked it before a take-over: followed, not asked again
                    children.append(earlier[machine_id].id)
                    continue
                x = s.get(m.Machine, machine_id, with_for_update=True)
                try:
                    child = failover.request_failover(s, x, run.kind, run.forced, None, f"plan-run {run_id}")
                except HTTPException as e:
                    raise RunFailed(f"group {position}: {x.name}: {e.detail}") from None
                child.plan_run_id = run_id
                children.append(child.id)
                jobs.log(s, job_id, f"group {position}: {x.name}: {run.kind} failover, job {child.id}")
        while True:
            self._tick(job_id)
            with self.store.session() as s:
                states = {j.id: (j.state, j.machine.name if j.machine else "?", j.message)
                          for j in s.scalars(select(m.Job).where(m.Job.id.in_(children)))}
            failed = [f"{name}: {msg}" for state, name, msg in states.values() if state in ("failed", "cancelled")]
            if failed:
                raise RunFailed(f"group {position}: " + "; ".join(failed)[:1500])
            if all(state == "succeeded" for state, _, _ in states.values()):
                return

    def _action(self, job_id: int, run_id: int, action_id: int, action_kind: str) -> None:
        with self.store.session() as s:
            a = s.get(m.PlanAction, action_id)
            argv, text, timeout = list(a.script or []), a.manual, a.timeout
            if action_kind == "manual":
                run = s.get(m.PlanRun, run_id, with_for_update=True)
                if any(c.get("action_id") == action_id for c in run.confirmations or []):
                    return                         # confirmed before a take-over
                run.state, run.waiting_action_id = "waiting_for_input", action_id
                jobs.log(s, job_id, f"waiting for manual action {action_id} to be confirmed: {text}")
        if action_kind == "manual":
            while True:
                self._tick(job_id)
                with self.store.session() as s:
                    run = s.get(m.PlanRun, run_id)
                    if run.state != "waiting_for_input":
                        return
        self._tick(job_id)
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout or 3600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise RunFailed(f"script action {action_id} ({argv[0]}): {e}") from None
        if done.returncode != 0:
            tail = " ".join((done.stderr or done.stdout or "").split())[-300:]
            raise RunFailed(f"script action {action_id} ({argv[0]}) exited with {done.returncode}: {tail}")
        with self.store.session() as s:
            jobs.log(s, job_id, f"script action {action_id} ({argv[0]}) succeeded")

    def _tick(self, job_id: int) -> None:
        """Wait a poll, keep the lease, and stop when a cancel was asked or the lease was lost."""
        if self._stop.wait(self.poll):
            raise Stopped()
        if not jobs.renew(self.store, job_id, self.name, lease=self.lease):
            raise RunFailed("this worker lost the run's lease")
        with self.store.session() as s:
            if s.get(m.Job, job_id).cancel_requested:
                raise RunFailed("cancelled through the API", cancelled=True)

    def _end(self, job_id: int, run_id: int | None, state: str, why: str) -> None:
        if not jobs.finish(self.store, job_id, self.name, state, why[:2000]):
            log.warning("plan run %s: %s, but the job is no longer this worker's", run_id, why)
            return
        if run_id is None:
            return
        with self.store.session() as s:
            run = s.get(m.PlanRun, run_id, with_for_update=True)
            if run is not None:
                run.state, run.finished_at, run.waiting_action_id = state, m.utcnow(), None
