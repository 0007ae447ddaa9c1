"""Jobs in the browser: progress moves on screen as the worker reports it (live stream, no reload), with a
rate and an ETA; the log follows; cancel goes through the API."""
from __future__ import annotations

from playwright.sync_api import expect

from replicator.controller import jobs

from . import fleet
from .conftest import login


def test_job_progress_moves_without_reload_and_cancel(portal, browser):
    built = fleet.build(portal)
    job = portal.api("POST", "/v1/machines/web01/resync").json()
    page = browser.page()
    login(page, portal, portal.admin_token)
    page.click("nav >> text=Jobs")
    row = page.locator("#jobs tbody tr", has_text=f"#{job['id']}")
    expect(row.locator("td[data-col=state]")).to_have_text("queued")
    page.evaluate("window.__same_document = true")          # gone if the page reloads
    # the host that carries the resync takes it and reports progress, as the host channel does
    claimed = jobs.claim(portal.store, "hv1-agent", kinds=["resync"], host_id=built["hosts"]["hv1"])
    assert claimed is not None and claimed.id == job["id"]
    expect(row.locator("td[data-col=state]")).to_have_text("running")
    assert jobs.renew(portal.store, job["id"], "hv1-agent", progress=40)
    expect(row.locator(".progress")).to_have_attribute("aria-valuenow", "40")
    expect(row.locator("td[data-col=rate]")).to_contain_text("%/min")
    expect(row.locator("td[data-col=eta]")).not_to_have_text("—")
    assert jobs.renew(portal.store, job["id"], "hv1-agent", progress=75)
    expect(row.locator(".progress")).to_have_attribute("aria-valuenow", "75")
    assert page.evaluate("window.__same_document") is True

    # one job's page: its log follows; cancel asks the worker (it holds a live lease) through the API
    row.locator("td[data-col=id] a").click()
    expect(page.locator("#job-log")).to_contain_text("claimed by hv1-agent")
    page.click("button[data-action=cancel]")
    page.click("dialog.confirm button[data-confirm]")
    expect(page.locator("#job-state")).to_contain_text("cancel requested")
    expect(page.locator("#job-log")).to_contain_text("cancel requested by admin")
    assert portal.api("GET", f"/v1/jobs/{job['id']}").json()["cancel_requested"] is True
    assert jobs.finish(portal.store, job["id"], "hv1-agent", "cancelled", "stopped at the operator's request")
    expect(page.locator("#job-state")).to_have_text("cancelled")
    expect(page.locator("#job-message")).to_have_text("stopped at the operator's request")
    expect(page.locator("button[data-action=cancel]")).to_have_count(0)
