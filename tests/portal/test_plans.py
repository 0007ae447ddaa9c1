"""Recovery plans in the browser: a plan defined through the form (the API's refusal shown), a test failover
run started from the page and followed live while its worker drives it, its manual action confirmed from the
page; a read-only user can neither run nor confirm."""
from __future__ import annotations

from playwright.sync_api import expect
from sqlalchemy import select

from replicator.controller import jobs
from replicator.controller import models as m

from . import fleet
from .conftest import login


def _drive(portal, run_id: int, **values) -> None:
    """What the worker running a plan writes as it goes (the run's state, group, the action it waits on)."""
    with portal.store.session() as s:
        run = s.get(m.PlanRun, run_id)
        for k, v in values.items():
            setattr(run, k, v)


def test_plan_run_followed_live_and_manual_action_confirmed(portal, browser):
    fleet.build(portal)
    page = browser.page()
    login(page, portal, portal.admin_token)
    page.click("nav >> text=Recovery plans")
    page.fill("#plan-form [name=name]", "gold-recovery")
    page.fill("#plan-form [name=groups]", "db01, nosuch | confirm: Check the database")
    page.click("#plan-form button[type=submit]")
    expect(page.locator("#plan-form .form-error")).to_contain_text("no machine 'nosuch'")
    page.fill("#plan-form [name=groups]", "db01 | confirm: Check the database\nweb01, web02")
    page.click("#plan-form button[type=submit]")
    page.click("#plans a:text('gold-recovery')")
    expect(page.locator("[data-group='1']")).to_contain_text("after: manual — Check the database")
    expect(page.locator("[data-group='2']")).to_contain_text("web02")

    op = browser.page()
    login(op, portal, portal.make_token("operator", "dr-lead"))
    op.goto(portal.url + "/ui/#/plans/gold-recovery")
    op.click("button[data-action=run-unplanned]")
    expect(op.locator("dialog.confirm")).to_contain_text("the primary site is lost")
    op.click("dialog.confirm button.secondary")                 # not that one
    op.click("button[data-action=run-test]")
    op.click("dialog.confirm button[data-confirm]")
    expect(op.locator("#run-state")).to_have_text("queued")
    run = portal.api("GET", "/v1/plans/gold-recovery/runs").json()[0]
    assert (run["kind"], run["state"], run["created_by"]) == ("test", "queued", "dr-lead")

    # the worker takes the run's job and drives it; the page follows without reload
    assert jobs.claim(portal.store, "plan-worker", kinds=["plan-run"]).id == run["job"]
    _drive(portal, run["id"], state="running", current_group=1)
    expect(op.locator("#run-state")).to_have_text("running")
    expect(op.locator("#run-group")).to_have_text("1 of 2")
    with portal.store.session() as s:
        action_id = s.scalar(select(m.PlanAction.id).where(m.PlanAction.manual == "Check the database"))
    _drive(portal, run["id"], state="waiting_for_input", waiting_action_id=action_id)
    expect(op.locator("#waiting-action")).to_contain_text("Check the database")

    viewer = browser.page()
    login(viewer, portal, portal.make_token("read-only", "viewer"))
    expect(viewer.locator("#needs-input")).to_contain_text("plan gold-recovery test failover, group 1")
    expect(viewer.locator("#jobs-waiting")).to_have_text("1 waiting for input")
    viewer.click("#needs-input a")
    expect(viewer.locator("#waiting-action")).to_contain_text("Check the database")
    expect(viewer.locator("#waiting-action button")).to_have_count(0)
    expect(viewer.locator("#plan-actions")).to_have_count(0)

    op.fill("#waiting-action [name=note]", "replica DB answers")
    op.click("button[data-action=confirm-action]")
    op.click("dialog.confirm button[data-confirm]")
    expect(op.locator("#run-state")).to_have_text("running")
    expect(op.locator("#waiting-action")).to_have_count(0)
    after = portal.api("GET", f"/v1/plan-runs/{run['id']}").json()
    assert [(c["action_id"], c["by"], c["note"]) for c in after["confirmations"]] == [
        (action_id, "dr-lead", "replica DB answers")]
    _drive(portal, run["id"], current_group=2)
    expect(op.locator("#run-group")).to_have_text("2 of 2")
    _drive(portal, run["id"], state="succeeded", finished_at=m.utcnow())
    expect(op.locator("#run-state")).to_have_text("succeeded")
    expect(viewer.locator("#run-state")).to_have_text("succeeded")
    expect(op.locator("#runs-table")).to_contain_text("dr-lead")
