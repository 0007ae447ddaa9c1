"""Extended replication in the console (issues 15 and 17): an admin gives a pair an extended leg from Settings
(the API's validation error shown word for word, nothing made), the machine page shows the leg as the replica
host reported it through the real host channel, Replicated items marks the machines with a leg, a read-only user
sees it all without a button, and removing the leg from Settings takes it off every page."""
from __future__ import annotations

from playwright.sync_api import expect

from replicator.controller import models as m

from . import fleet
from .conftest import login


def _fill(page, form: str, **values) -> None:
    for name, value in values.items():
        field = page.locator(f"#{form} [name={name}]")
        if field.evaluate("e => e.tagName") == "SELECT":
            field.select_option(value)
        else:
            field.fill(value)
    page.click(f"#{form} button[type=submit]")


def test_extended_leg_in_settings_machine_page_and_items(portal, browser, tmp_path):
    fleet.build(portal)
    assert portal.api("POST", "/v1/sites", json={"name": "gamma"}).status_code == 201
    assert portal.api("POST", "/v1/clouds", json={"name": "gold-ext", "site": "gamma"}).status_code == 201
    fleet.add_host(portal, "ex1", "gamma")
    assert portal.api("PUT", "/v1/hosts/ex1/cloud", json={"cloud": "gold-ext"}).status_code == 200

    page = browser.page()
    login(page, portal, portal.admin_token)
    page.click("nav >> text=Settings")
    expect(page.locator("#extended-legs")).to_contain_text("No pair has an extended leg.")
    # refused by the API's own validation: shown as the API words it, nothing made
    _fill(page, "extended-form", pair="gold-pair", cloud="gold-ext", frequency="7m")
    error = page.locator("#extended-form .form-error")
    expect(error).to_be_visible()
    api_says = portal.api("POST", "/v1/pairs/gold-pair/extended", json={
        "cloud": "gold-ext", "frequency": "7m", "additional_points": 0, "compression": True,
        "auth": "certificate"}).json()["error"]
    assert "5m or 15m" in api_says
    expect(error).to_have_text(api_says)
    _fill(page, "extended-form", pair="gold-pair", cloud="gold-dr", frequency="15m")
    expect(error).to_have_text(portal.api("POST", "/v1/pairs/gold-pair/extended", json={
        "cloud": "gold-dr", "frequency": "15m"}).json()["error"])
    assert portal.api("GET", "/v1/pairs/gold-pair/extended").status_code == 404
    # made: the leg, its policy and where each machine's extended replica is
    _fill(page, "extended-form", pair="gold-pair", cloud="gold-ext", frequency="15m", additional_points="2",
          bandwidth_limit="10M")
    leg = page.locator("#extended-legs tbody tr", has_text="gold-pair")
    expect(leg.locator("td[data-col=cloud]")).to_have_text("gold-ext")
    expect(leg.locator("td[data-col=frequency]")).to_have_text("15 min")
    expect(leg.locator("td[data-col=bandwidth_limit]")).to_have_text("10.0 MiB/s")
    expect(leg.locator("td[data-col=machines]")).to_contain_text("web01: ex1")
    expect(page.locator("#pairs tbody tr", has_text="gold-pair").locator("td[data-col=extended]")) \
        .to_have_text("gold-ext")
    made = portal.api("GET", "/v1/pairs/gold-pair/extended").json()
    assert (made["cloud"], made["frequency"], made["additional_points"], made["bandwidth_limit"]) == \
        ("gold-ext", 900, 2, 10 << 20)

    # the replica host reports web01's leg through the host channel; web02's is not reported yet
    last = m.utcnow().timestamp() - 120
    fleet.host_report(fleet.as_host(portal, tmp_path, "dr1"), {"status": {"machines": []}, "extended": [
        {"machine": "web01", "state": "Replicating", "reason": None,
         "stats": {"health": "Warning", "last_replication_time": last}}]})
    page.goto(portal.url + "/ui/#/machines/web01")
    expect(page.locator("#extended-state")).to_have_text("Replicating")
    expect(page.locator("#extended-health")).to_have_text("Warning")
    expect(page.locator("#extended-host")).to_have_text("ex1 in cloud gold-ext")
    expect(page.locator("#extended-last-success")).to_contain_text("min")       # 2 min ago
    page.goto(portal.url + "/ui/#/machines/web02")
    expect(page.locator("#extended-state")).to_have_text("(not reported yet)")
    expect(page.locator("#extended-last-success")).to_have_text("never")
    page.click("nav >> text=Replicated items")
    rows = page.locator("#items tbody tr")
    expect(rows.filter(has_text="web01").locator("td[data-col=extended]")).to_have_text("Warning ex1")
    expect(rows.filter(has_text="web02").locator("td[data-col=extended]")).to_have_text("Unknown ex1")
    page.fill("input.filter", "extended Warning")
    expect(rows).to_have_count(1)

    # read-only: sees the leg and the panel, no form and no button
    viewer = browser.page()
    login(viewer, portal, portal.make_token("read-only", "auditor"))
    viewer.click("nav >> text=Settings")
    expect(viewer.locator("#extended-legs tbody tr", has_text="gold-pair")).to_contain_text("gold-ext")
    expect(viewer.locator("#extended-form")).to_have_count(0)
    expect(viewer.locator("button[data-action=remove-extended]")).to_have_count(0)
    viewer.goto(portal.url + "/ui/#/machines/web01")
    expect(viewer.locator("#extended-state")).to_have_text("Replicating")

    # removed from Settings (confirmed): gone from the API, the machine page and the items
    page.click("nav >> text=Settings")
    page.locator("#extended-legs tbody tr", has_text="gold-pair").locator("button[data-action=remove-extended]").click()
    page.click("dialog.confirm button[data-confirm]")
    expect(page.locator("#extended-legs")).to_contain_text("No pair has an extended leg.")
    assert portal.api("GET", "/v1/pairs/gold-pair/extended").status_code == 404
    page.goto(portal.url + "/ui/#/machines/web01")
    expect(page.locator("#machine-summary")).to_be_visible()
    expect(page.locator("#machine-extended")).to_have_count(0)
    page.click("nav >> text=Replicated items")
    expect(rows.filter(has_text="web01").locator("td[data-col=extended]")).to_have_text("—")
