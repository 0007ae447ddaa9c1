"""The console in a real headless Chromium against the real controller: sign-in and roles, the Overview and
Replicated items over a small fleet, a machine's actions through the API (and its audit entry)."""
from __future__ import annotations

from playwright.sync_api import expect

from replicator.controller import jobs

from . import fleet
from .conftest import login


def test_sign_in_refuses_a_bad_token_then_admin_sees_the_fleet(portal, browser, tmp_path):
    fleet.build(portal)
    page = browser.page()
    page.goto(portal.url + "/ui/")
    page.fill("#token", "rpc_not-a-token")
    page.click("#login button[type=submit]")
    expect(page.locator("#login .form-error")).to_contain_text("not valid")
    login(page, portal, portal.admin_token)
    expect(page.locator("#who")).to_have_text("admin (admin)")
    counts = page.locator("#health-counts")
    for health, n in (("Normal", 1), ("Warning", 1), ("Critical", 1), ("Unknown", 1)):
        expect(counts.locator(f"li[data-health={health}] strong")).to_have_text(str(n))
    expect(page.locator("#by-state")).to_contain_text("Replicating")
    # web02 (900 s) and db01 (4000 s) are past the policy's 5-minute target; web01 (40 s) is not
    breaches = page.locator("#rpo-breaches")
    expect(breaches).to_contain_text("db01")
    expect(breaches).to_contain_text("web02")
    expect(breaches).not_to_contain_text("web01")
    causes = page.locator("#errors-by-cause tbody tr")
    expect(causes.filter(has_text="the last cycle failed: https://dr1:8444: connection refused")).to_contain_text("1")
    expect(causes.filter(has_text="# of # cycles missed (# % > # %)")).to_be_visible()
    expect(page.locator("#test-freshness")).to_contain_text("Test recommended for 4 of 4 machines")
    problems = page.locator("#config-problems")
    expect(problems).to_contain_text("Host dr1 has not reported for over 5 minutes.")
    expect(problems).to_contain_text("Host dr1's certificate expires in 2 days.")
    page.wait_for_timeout(300)      # the donut draws on its canvas
    page.screenshot(path=str(tmp_path / "overview.png"), full_page=True)
    # the session ends with the tab: the token is in sessionStorage, no cookie is ever set
    assert browser.context.cookies() == []
    page.click("#logout")
    expect(page.locator("#login")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0


def test_read_only_user_sees_no_action_buttons(portal, browser):
    fleet.build(portal)
    viewer = portal.make_token("read-only", "viewer")
    page = browser.page()
    login(page, portal, viewer)
    expect(page.locator("#who")).to_have_text("viewer (read-only)")
    page.goto(portal.url + "/ui/#/machines/web01")
    expect(page.locator("#machine-state")).to_have_text("Replicating")
    expect(page.locator("#machine-actions button")).to_have_count(0)
    assert page.locator("button.danger, button[data-action]").count() == 0
    # a host's report moves the page and adds a point to the RPO chart, without reload
    rpo_points = "() => Chart.getChart('rpo-chart').data.datasets[0].data.map(p => p.y)"
    assert page.evaluate(rpo_points) == [40]
    fleet.observe(portal, "web01", rpo_seconds=400.0, health="Warning")
    expect(page.locator("#machine-rpo")).to_have_text("6 min 40 s / 5 min")
    expect(page.locator("#machine-health")).to_have_text("Warning")
    assert page.evaluate(rpo_points) == [40, 400]
    # the same page as an operator has them
    op = browser.page()
    login(op, portal, portal.make_token("operator", "oper"))
    op.goto(portal.url + "/ui/#/machines/web01")
    expect(op.locator("#machine-actions button[data-action=pause]")).to_be_visible()


def test_replicated_items_sort_and_filter(portal, browser):
    built = fleet.build(portal)
    # web01 had a test failover: its replica host ran it
    job = portal.api("POST", "/v1/machines/web01/failover", json={"kind": "test"}).json()
    assert jobs.claim(portal.store, "dr1-agent", kinds=["failover"], host_id=built["hosts"]["dr1"]).id == job["id"]
    assert jobs.finish(portal.store, job["id"], "dr1-agent", "succeeded")
    page = browser.page()
    login(page, portal, portal.admin_token)
    page.click("nav >> text=Replicated items")
    rows = page.locator("#items tbody tr")
    expect(rows).to_have_count(4)
    expect(rows.first.locator("td[data-col=name]")).to_have_text("app01")      # by name, ascending
    page.click("#items th[data-key=rpo]")
    expect(rows.first.locator("td[data-col=name]")).to_have_text("web01")      # smallest RPO first
    page.click("#items th[data-key=rpo]")
    expect(rows.first.locator("td[data-col=name]")).to_have_text("db01")
    expect(rows.first.locator("td[data-col=rpo] .breach")).to_have_count(1)
    expect(rows.filter(has_text="web01").locator("td[data-col=last_test]")).to_contain_text("ago")
    expect(rows.filter(has_text="web02").locator("td[data-col=last_test]")).to_have_text("never")
    pending = rows.filter(has_text="web02").locator("td[data-col=pending]")
    expect(pending).to_have_text("12.0 MiB")
    expect(rows.filter(has_text="web02").locator("td[data-col=health] .badge")).to_have_attribute(
        "title", "4 of 12 cycles missed (33 % > 20 %)")
    page.fill("input.filter", "critical")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("db01")
    page.click("#items td[data-col=name] a")
    expect(page.locator("#page-machines h1")).to_contain_text("db01")
    expect(page.locator("#health-reasons")).to_contain_text("connection refused")
    expect(page.locator("#machine-pending")).to_have_text("40.0 MiB")
    expect(page.locator("#machine-cycles")).to_have_text("12 succeeded, 1 failed, 0 missed")
    page.go_back()                                          # the browser's history works: back to the table
    expect(rows).to_have_count(4)
    page.click("nav >> text=Overview")
    expect(page.locator("#test-freshness")).to_contain_text("Test recommended for 3 of 4 machines")


def test_machine_action_goes_through_the_api_and_is_audited(portal, browser):
    fleet.build(portal)
    page = browser.page()
    login(page, portal, portal.make_token("operator", "night-shift"))
    page.goto(portal.url + "/ui/#/machines/web01")
    page.click("#machine-actions button[data-action=pause]")
    dialog = page.locator("dialog.confirm")
    expect(dialog).to_contain_text("Pause replication")
    dialog.locator("button.secondary").click()                  # cancelled: nothing is sent
    assert portal.api("GET", "/v1/machines/web01").json()["desired_state"] == "enabled"
    page.click("#machine-actions button[data-action=pause]")
    page.click("dialog.confirm button[data-confirm]")
    expect(page.locator("#machine-desired")).to_have_text("paused")
    expect(page.locator("#machine-actions button[data-action=resume]")).to_be_visible()
    expect(page.locator("#machine-job-table")).to_contain_text("pause-protection")
    assert portal.api("GET", "/v1/machines/web01").json()["desired_state"] == "paused"
    audit = portal.api("GET", "/v1/audit?actor=night-shift").json()
    assert [(a["action"], a["target"], a["outcome"]) for a in audit] == [
        ("POST /v1/machines/{name}/pause", "machine/web01", "202 ok")]
    page.click("#machine-actions button[data-action=failover-unplanned]")
    page.check("dialog.confirm input[name=force]")
    page.click("dialog.confirm button[data-confirm]")
    expect(page.locator("#machine-job-table")).to_contain_text("failover (unplanned)")
    failover = portal.api("GET", "/v1/jobs?machine=web01&kind=failover").json()
    assert [(j["params"]["kind"], j["params"]["force"]) for j in failover] == [("unplanned", True)]
    portal.api("POST", f"/v1/jobs/{failover[0]['id']}/cancel")     # one failover job at a time per machine
    page.click("#machine-actions button[data-action=failover-test]")
    expect(page.locator("dialog.confirm input[name=force]")).to_have_count(0)     # only unplanned is forced
    page.click("dialog.confirm button[data-confirm]")
    expect(page.locator("#machine-job-table")).to_contain_text("failover (test)")


def test_no_request_leaves_loopback(portal, browser):
    """The console's CSP lets a page fetch nothing but the controller, and the fixture that keeps every test on
    loopback does catch a request elsewhere (here a navigation, which the CSP does not govern)."""
    page = browser.page()
    login(page, portal, portal.admin_token)
    outcome = page.evaluate("""async () => {
        try { await fetch('https://cdn.example.invalid/lib.js', {mode: 'no-cors'}); return 'fetched'; }
        catch (e) { return 'refused'; } }""")
    assert outcome == "refused"
    browser.expect_errors("Content Security Policy", "cdn.example.invalid")
    csp = portal.api("GET", "/ui/").headers["content-security-policy"]
    assert "default-src 'self'" in csp and "connect-src 'self'" in csp
    assert browser.external == []
    try:
        page.goto("https://cdn.example.invalid/")
    except Exception as e:                    # aborted by the guard
        assert "ERR_FAILED" in str(e), e
    assert browser.external == ["https://cdn.example.invalid/"]
    browser.external.clear()
    browser.expect_errors("cdn.example.invalid")


def test_a_revoked_token_signs_the_console_out(portal, browser):
    page = browser.page()
    login(page, portal, portal.make_token("operator", "contractor"))
    expect(page.locator("#live")).to_have_text("live")
    assert portal.api("DELETE", "/v1/tokens/contractor").status_code == 204
    expect(page.locator("#login .form-error")).to_have_text("The token is no longer valid.")
    assert page.evaluate("sessionStorage.length") == 0
    expect(page.locator("#live")).to_have_text("offline")


def test_after_a_lost_stream_the_page_reads_the_api_again(portal, browser):
    """What changed while the event stream was down was never sent: on reconnecting, the page is redrawn."""
    fleet.build(portal)
    page = browser.page()
    login(page, portal, portal.admin_token)
    page.click("nav >> text=Replicated items")
    state = page.locator("#items tbody tr", has_text="web01").locator("td[data-col=state]")
    expect(state).to_have_text("Replicating")
    expect(page.locator("#live")).to_have_text("live")
    portal.stop()                                   # the stream drops; the page keeps what it has
    expect(page.locator("#live")).to_have_text("offline")
    fleet.observe(portal, "web01", observed_state="Suspended")
    portal.start()
    expect(page.locator("#live")).to_have_text("live")
    expect(state).to_have_text("Suspended")
    browser.expect_errors("ERR_CONNECTION_REFUSED", "ERR_INCOMPLETE_CHUNKED_ENCODING")   # while it was down
