"""The machine page's history (issue 15) in a real Chromium: the RPO chart starts from the controller's samples
(written by real host reports through the host channel), the cycle chart, the recovery points the replica host
reported, the audit entries of this machine only, and the failover steps -- commit and cancel after a failover,
reverse replication once committed, cleanup after a test failover -- shown to operators only when they apply."""
from __future__ import annotations

from playwright.sync_api import expect

from replicator.controller import jobs

from . import fleet
from .conftest import login

RPO_DATA = "() => Chart.getChart('rpo-chart').data.datasets[0].data.map(p => p.y)"
CYCLE_DATA = "() => Chart.getChart('cycle-chart').data.datasets.map(d => d.data.map(p => p.y))"


def _succeeded(portal, built, machine: str, body: dict) -> None:
    """A failover the replica host ran to its end (as the host channel would record it)."""
    job = portal.api("POST", f"/v1/machines/{machine}/failover", json=body).json()
    assert jobs.claim(portal.store, "dr1-agent", kinds=["failover"], host_id=built["hosts"]["dr1"]).id == job["id"]
    assert jobs.finish(portal.store, job["id"], "dr1-agent", "succeeded")


def test_machine_page_shows_history_points_and_failover_steps(portal, browser, tmp_path):
    built = fleet.build(portal)
    fleet.history(portal, tmp_path, "web01", (30.0, 90.0, 150.0), primary="hv1", replica="dr1")
    _succeeded(portal, built, "web01", {"kind": "unplanned", "force": True})
    _succeeded(portal, built, "web02", {"kind": "test"})

    page = browser.page()
    login(page, portal, portal.make_token("operator", "oper"))
    page.goto(portal.url + "/ui/#/machines/web01")
    expect(page.locator("#machine-state")).to_have_text("Replicating")
    # the chart starts from the three samples, then the machine as the page opened (its last report)
    assert page.evaluate(RPO_DATA) == [30, 90, 150, 150]
    assert page.evaluate(CYCLE_DATA) == [[1, 2, 3], [2, 4, 6]]
    expect(page.locator("#points-summary")).to_contain_text("3 recovery points on dr1, reported")
    rows = page.locator("#machine-point-table tbody tr")
    expect(rows).to_have_count(3)
    expect(rows.nth(0).locator("td[data-col=point]")).to_have_text("3")          # newest first
    expect(rows.nth(1).locator("td[data-col=consistency]")).to_have_text("application")
    expect(rows.nth(2).locator("td[data-col=generations]")).to_have_text("11")
    # this machine's audit entries only (web02's failover is not among them)
    events = page.locator("#machine-events tbody tr")
    expect(events.locator("td[data-col=action]")).to_have_text(["POST /v1/machines/{name}/failover",
                                                                "POST /v1/machines"])
    # failed over: commit and cancel, not cleanup (no test failover of web01)
    actions = page.locator("#machine-actions")
    expect(actions.locator("button[data-action=commit-failover]")).to_be_visible()
    expect(actions.locator("button[data-action=cancel-failover]")).to_be_visible()
    expect(actions.locator("button[data-action=cleanup-test-failover]")).to_have_count(0)
    page.wait_for_timeout(200)
    page.screenshot(path=str(tmp_path / "machine-history.png"), full_page=True)
    # declining the confirmation sends nothing; confirming queues the commit, and the steps go while it runs
    page.click("#machine-actions button[data-action=commit-failover]")
    expect(page.locator("dialog.confirm")).to_contain_text("Commit failover")
    page.click("dialog.confirm button.secondary")
    assert portal.api("GET", "/v1/jobs?machine=web01&kind=commit-failover").json() == []
    page.click("#machine-actions button[data-action=commit-failover]")
    page.click("dialog.confirm button[data-confirm]")
    expect(page.locator("#machine-job-table")).to_contain_text("commit-failover")
    expect(actions.locator("button[data-action=commit-failover]")).to_have_count(0)
    expect(actions.locator("button[data-action=cancel-failover]")).to_have_count(0)
    [commit] = portal.api("GET", "/v1/jobs?machine=web01&kind=commit-failover").json()
    assert commit["state"] == "queued"
    # the replica host commits it: the page, told by the job's event, offers reverse replication (and only that)
    assert jobs.claim(portal.store, "dr1-agent", kinds=["commit-failover"], host_id=built["hosts"]["dr1"]).id \
        == commit["id"]
    assert jobs.finish(portal.store, commit["id"], "dr1-agent", "succeeded")
    expect(actions.locator("button[data-action=reverse]")).to_be_visible()
    expect(actions.locator("button[data-action=failback]")).to_have_count(0)
    page.click("#machine-actions button[data-action=reverse]")
    page.click("dialog.confirm button[data-confirm]")
    expect(page.locator("#machine-job-table")).to_contain_text("reverse")
    expect(actions.locator("button[data-action=reverse]")).to_have_count(0)
    # reverse replication runs: fail back is offered
    [reverse] = portal.api("GET", "/v1/jobs?machine=web01&kind=reverse").json()
    assert jobs.claim(portal.store, "hv1-agent", kinds=["reverse"], host_id=built["hosts"]["hv1"]).id \
        == reverse["id"]                             # (its first step is the primary host's accept)
    assert jobs.finish(portal.store, reverse["id"], "hv1-agent", "succeeded")
    expect(actions.locator("button[data-action=failback]")).to_be_visible()
    expect(actions.locator("button[data-action=reverse]")).to_have_count(0)

    # web02 had a test failover: cleanup only
    page.goto(portal.url + "/ui/#/machines/web02")
    expect(page.locator("#machine-state")).to_have_text("Replicating")
    expect(actions.locator("button[data-action=cleanup-test-failover]")).to_be_visible()
    expect(actions.locator("button[data-action=commit-failover]")).to_have_count(0)
    # dr1 is its replica host too and reported no point of it
    expect(page.locator("#points-summary")).to_contain_text("0 recovery points on dr1")
    expect(page.locator("#machine-point-table")).to_contain_text("No recovery point holds all its disks yet.")
    page.click("#machine-actions button[data-action=cleanup-test-failover]")
    page.click("dialog.confirm button[data-confirm]")
    expect(page.locator("#machine-job-table")).to_contain_text("cleanup-test-failover")
    expect(actions.locator("button[data-action=cleanup-test-failover]")).to_have_count(0)

    # a read-only user sees the same history and points, and no button at all
    viewer = browser.page()
    login(viewer, portal, portal.make_token("read-only", "viewer"))
    viewer.goto(portal.url + "/ui/#/machines/web01")
    expect(viewer.locator("#machine-point-table tbody tr")).to_have_count(3)
    assert viewer.evaluate(RPO_DATA)[:3] == [30, 90, 150]
    expect(viewer.locator("#machine-actions button")).to_have_count(0)
