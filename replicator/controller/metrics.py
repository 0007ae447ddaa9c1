"""Prometheus metrics of the fleet at /metrics (any token, read-only suffices), read from the database at each
scrape by a custom collector, so every controller process on a shared database reports the same numbers."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select

from . import models as m
from .api.common import ERRORS
from .auth import reader
from .db import Store

router = APIRouter(tags=["metrics"])


class FleetCollector:
    """Machines by desired state and health, RPO and last success per machine, jobs by state, hosts' last
    contact."""

    def __init__(self, store: Store):
        self.store = store

    def collect(self):
        machines = GaugeMetricFamily("replicator_machines", "Protected machines by desired state and health",
                                     labels=["state", "health"])
        rpo = GaugeMetricFamily("replicator_machine_rpo_seconds", "Recovery point age its hosts last reported",
                                labels=["machine", "cloud"])
        success = GaugeMetricFamily("replicator_machine_last_success_timestamp_seconds",
                                    "When its last replication cycle succeeded (Unix time)",
                                    labels=["machine", "cloud"])
        epoch = GaugeMetricFamily("replicator_machine_fencing_epoch", "The machine's fencing epoch",
                                  labels=["machine"])
        jobs = GaugeMetricFamily("replicator_jobs", "Jobs by state", labels=["state"])
        seen = GaugeMetricFamily("replicator_host_last_seen_timestamp_seconds",
                                 "When the host last reached the controller (Unix time)", labels=["host", "site"])
        with self.store.session() as s:
            for state, health, n in s.execute(select(m.Machine.desired_state, m.Machine.health, func.count())
                                              .group_by(m.Machine.desired_state, m.Machine.health)):
                machines.add_metric([state, health or "unknown"], n)
            rows = s.execute(select(m.Machine.name, m.Cloud.name, m.Machine.rpo_seconds, m.Machine.last_success_at,
                                    m.Machine.fencing_epoch).join(m.Cloud, m.Machine.cloud_id == m.Cloud.id))
            for name, cloud, rpo_s, last, ep in rows:
                if rpo_s is not None:
                    rpo.add_metric([name, cloud], rpo_s)
                if last is not None:
                    success.add_metric([name, cloud], last.timestamp())
                epoch.add_metric([name], ep)
            counts = dict(s.execute(select(m.Job.state, func.count()).group_by(m.Job.state)).all())
            for state in m.JOB_STATES:
                jobs.add_metric([state], counts.get(state, 0))
            for host, site, last in s.execute(select(m.Host.hostname, m.Site.name, m.Host.last_seen)
                                              .join(m.Site, m.Host.site_id == m.Site.id)):
                if last is not None:
                    seen.add_metric([host, site], last.timestamp())
        yield from (machines, rpo, success, epoch, jobs, seen)


def registry_for(store: Store) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(store))
    return registry


@router.get("/metrics", response_class=Response, dependencies=[Depends(reader)],
            responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
                             "description": "Prometheus text exposition format"},
                       **{k: v for k, v in ERRORS.items() if k in (401, 403, 422)}})
def scrape(request: Request):
    return Response(generate_latest(registry_for(request.app.state.store)), media_type=CONTENT_TYPE_LATEST)
