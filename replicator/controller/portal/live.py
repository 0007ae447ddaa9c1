"""What the live-update stream sends: the jobs, machines and plan runs that changed since the last look.

Every controller process (and every host's report) writes to the database, so the database is where changes
are seen: each open stream looks about once a second at a few columns of each row and compares them with what
it saw last; only rows that changed are loaded whole and sent, shaped exactly as the REST API returns them
(the API's own serializers), so a page merges an event into what it read from the API. A stream sends
nothing for the rows as they were when it opened, only a `ready` event, after which a page that reconnected
reads the API again.
"""
from __future__ import annotations

import datetime as dt

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from .. import models as m
from ..api.jobs import job_out
from ..api.machines import machine_out
from ..api.plans import run_out

SLACK = dt.timedelta(seconds=5)


class Watcher:
    """Remembers what one stream saw; `poll` returns (event, data) for each row that changed since."""

    def __init__(self) -> None:
        self.started = m.utcnow()
        self.since = self.started
        self.first = True
        self.jobs: dict[int, tuple] = {}
        self.machines: dict[int, tuple] = {}
        self.runs: dict[int, tuple] = {}

    def poll(self, s: Session) -> list[tuple[str, dict]]:
        # Rows finished since a little before the last look are read once more (a commit may land late);
        # rows finished before that were sent already and are forgotten, so the look stays small.
        since, self.since = self.since - SLACK, m.utcnow()
        changed_jobs = self._changed(self.jobs, s.execute(
            select(m.Job.id, m.Job.state, m.Job.progress, m.Job.message, m.Job.cancel_requested,
                   m.Job.finished_at, m.Job.claimed_by)
            .where(or_(m.Job.state.not_in(m.JOB_DONE), m.Job.finished_at >= since,
                       m.Job.id.in_(list(self.jobs) or [-1])))), since)
        changed_machines, removed = self._changed_all(self.machines, s.execute(
            select(m.Machine.id, m.Machine.desired_state, m.Machine.observed_state, m.Machine.health,
                   m.Machine.rpo_seconds, m.Machine.last_success_at, m.Machine.observed_at,
                   m.Machine.primary_host_id, m.Machine.replica_host_id, m.Machine.fencing_epoch)))
        changed_runs = self._changed(self.runs, s.execute(
            select(m.PlanRun.id, m.PlanRun.state, m.PlanRun.current_group, m.PlanRun.waiting_action_id,
                   m.PlanRun.confirmations, m.PlanRun.finished_at)
            .where(or_(m.PlanRun.finished_at.is_(None), m.PlanRun.finished_at >= since,
                       m.PlanRun.id.in_(list(self.runs) or [-1])))), since)
        if self.first:
            self.first = False
            return [("ready", {"at": self.started.isoformat()})]
        events: list[tuple[str, dict]] = []
        if changed_jobs:
            for job in s.scalars(select(m.Job).where(m.Job.id.in_(changed_jobs)).order_by(m.Job.id)):
                events.append(("job", job_out(job).model_dump(mode="json")))
        if changed_machines:
            for x in s.scalars(select(m.Machine).where(m.Machine.id.in_(changed_machines)).order_by(m.Machine.id)):
                events.append(("machine", machine_out(x).model_dump(mode="json")))
        events += [("machine_removed", {"id": gone}) for gone in removed]
        if changed_runs:
            for run in s.scalars(select(m.PlanRun).where(m.PlanRun.id.in_(changed_runs)).order_by(m.PlanRun.id)):
                events.append(("plan_run", run_out(s, run).model_dump(mode="json")))
        return events

    @staticmethod
    def _changed(seen: dict[int, tuple], rows, since: dt.datetime | None = None) -> list[int]:
        changed = []
        for row in rows:
            key, fp = row[0], tuple(str(v) for v in row[1:])
            if seen.get(key) != fp:
                seen[key] = fp
                changed.append(key)
            elif since is not None and row.finished_at is not None and row.finished_at < since:
                del seen[key]
        return changed

    def _changed_all(self, seen: dict[int, tuple], rows) -> tuple[list[int], list[int]]:
        """For a table read whole: the rows that changed and the ids that are gone."""
        present = []
        changed = []
        for row in rows:
            present.append(row[0])
            changed += self._changed(seen, [row])
        removed = sorted(set(seen) - set(present))
        for key in removed:
            del seen[key]
        return changed, removed
