"""A screenshot of every page over a small fleet with jobs, a plan run and an extended leg (into the test's tmp dir, or into
$PORTAL_SCREENSHOTS, which is how docs/portal/ is made: PORTAL_SCREENSHOTS=docs/portal pytest ...)."""
from __future__ import annotations

import os

from playwright.sync_api import expect

from replicator.controller import jobs
from replicator.controller import models as m

from . import fleet
from .conftest import login

PAGES = [("overview", "#/overview", "#health-counts"), ("items", "#/items", "#items"),
         ("machine", "#/machines/web02", "#machine-summary"), ("jobs", "#/jobs", "#jobs"),
         ("plan", "#/plans/gold-recovery", "#plan-runs"), ("infrastructure", "#/infrastructure", "#hosts"),
         ("settings", "#/settings", "#policies")]


def test_screenshot_every_page(portal, browser, tmp_path):
    built = fleet.build(portal)
    # web02's last hour and a half as its hosts reported it: RPO samples (one cycle each) and recovery points
    fleet.history(portal, tmp_path, "web02", [60.0 + 40 * (i % 5) + 15 * i for i in range(18)], primary="hv1",
                  replica="dr1", points=6, minutes=5, health="Warning", reasons=(fleet.MISSED,))
    fleet.report(portal, "hv1", fleet.hv1_entries())      # hv1's stored report names both its machines again
    # an extended leg to a third site, which dr1 reports for web02 (machine page, items, settings show it)
    portal.api("POST", "/v1/sites", json={"name": "gamma"})
    portal.api("POST", "/v1/clouds", json={"name": "gold-ext", "site": "gamma"})
    fleet.add_host(portal, "ex1", "gamma")
    portal.api("PUT", "/v1/hosts/ex1/cloud", json={"cloud": "gold-ext"})
    assert portal.api("POST", "/v1/pairs/gold-pair/extended",
                      json={"cloud": "gold-ext", "frequency": "15m"}).status_code == 201
    fleet.host_report(fleet.as_host(portal, tmp_path, "dr1"), {"status": {"machines": []}, "extended": [
        {"machine": "web02", "state": "Replicating", "reason": None,
         "stats": {"health": "Normal", "last_replication_time": m.utcnow().timestamp() - 400}}]})
    out = os.environ.get("PORTAL_SCREENSHOTS") or str(tmp_path)
    os.makedirs(out, exist_ok=True)
    portal.api("POST", "/v1/machines/web02/resync")
    portal.api("POST", "/v1/plans", json={"name": "gold-recovery", "pair": "gold-pair", "groups": [
        {"members": ["db01"], "post": [{"manual": "Check the database answers"}]}, {"members": ["web01", "web02"]}]})
    portal.api("POST", "/v1/plans/gold-recovery/runs", json={"kind": "test"})
    job = jobs.claim(portal.store, "hv1-agent", kinds=["resync"], host_id=built["hosts"]["hv1"])
    jobs.renew(portal.store, job.id, "hv1-agent", progress=35)
    failed = jobs.claim(portal.store, "hv2-agent", kinds=["enable-protection"], host_id=built["hosts"]["hv2"])
    jobs.finish(portal.store, failed.id, "hv2-agent", "failed", "replica host dr1 unreachable")
    page = browser.page()
    login(page, portal, portal.admin_token)
    for name, route, ready in PAGES:
        page.goto(f"{portal.url}/ui/{route}")
        expect(page.locator(ready)).to_be_visible()
        page.wait_for_timeout(300)               # charts draw on their canvas
        path = os.path.join(out, f"{name}.png")
        page.screenshot(path=path, full_page=True)
        assert os.path.getsize(path) > 10_000, path
