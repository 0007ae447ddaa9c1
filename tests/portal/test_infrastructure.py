"""Infrastructure in the browser: hosts green or red by their last report, certificates near expiry flagged,
replication links with their worst health, a site created and a registration key made through the API."""
from __future__ import annotations

import json

from playwright.sync_api import expect
from sqlalchemy import select

from replicator.controller import models as m

from . import fleet
from .conftest import login


def test_hosts_links_sites_and_registration_key(portal, browser):
    fleet.build(portal)
    page = browser.page()
    login(page, portal, portal.admin_token)
    page.click("nav >> text=Infrastructure")
    hosts = page.locator("#hosts tbody tr")
    expect(hosts).to_have_count(3)
    expect(hosts.filter(has_text="hv1").locator("[data-up]")).to_have_attribute("data-up", "1")
    expect(hosts.filter(has_text="dr1").locator("[data-up]")).to_have_attribute("data-up", "0")
    expect(hosts.filter(has_text="dr1").locator("td[data-col=cert] .breach")).to_contain_text("2 days")
    expect(hosts.filter(has_text="hv1").locator("td[data-col=cert] .breach")).to_have_count(0)
    links = page.locator("#links tbody tr")
    expect(links.filter(has_text="hv1")).to_contain_text("2: web01, web02")
    expect(links.filter(has_text="hv1").locator("td[data-col=health]")).to_have_text("Warning")
    expect(links.filter(has_text="hv2").locator("td[data-col=health]")).to_have_text("Critical")

    page.fill("#site-form [name=name]", "no spaces allowed")
    page.click("#site-form button[type=submit]")
    expect(page.locator("#site-form .form-error")).to_contain_text("name:")
    page.fill("#site-form [name=name]", "gamma")
    page.click("#site-form button[type=submit]")
    row = page.locator("#sites tbody tr", has_text="gamma")
    expect(row).to_be_visible()
    row.locator("button[data-action=registration-key]").click()
    key = json.loads(page.locator("#registration-key-text").inner_text())
    assert key["site"] == "gamma" and key["token"].startswith("rrk_") and len(key["ca_sha256"]) == 64
    assert key["controller"] == portal.url
    expect(page.locator("#registration-key-download")).to_have_attribute("download", "gamma.key")
    with portal.store.session() as s:
        site_id = s.scalar(select(m.Site.id).where(m.Site.name == "gamma"))
        assert s.scalar(select(m.RegistrationKey.expires_at).where(m.RegistrationKey.site_id == site_id))

    # a newly registered host goes into a cloud of its own site; the API's refusals are shown as worded
    fleet.add_host(portal, "hv3", "alpha")
    page.reload()
    page.select_option("#host-cloud-form [name=host]", "hv3")
    page.select_option("#host-cloud-form [name=cloud]", "gold-dr")
    page.click("#host-cloud-form button[type=submit]")
    expect(page.locator("#host-cloud-form .form-error")).to_have_text(
        "cloud: 'gold-dr' is on site 'beta', host 'hv3' on 'alpha'")
    page.select_option("#host-cloud-form [name=cloud]", "gold")
    page.click("#host-cloud-form button[type=submit]")
    expect(hosts.filter(has_text="hv3").locator("td[data-col=cloud]")).to_have_text("gold")
    assert portal.api("GET", "/v1/hosts/hv3").json()["cloud"] == "gold"
    page.select_option("#host-cloud-form [name=host]", "hv2")
    page.select_option("#host-cloud-form [name=cloud]", "")
    page.click("#host-cloud-form button[type=submit]")
    expect(page.locator("#host-cloud-form .form-error")).to_contain_text("has 2 machine(s) placed on it")
    assert portal.api("GET", "/v1/hosts/hv2").json()["cloud"] == "gold"

    # forgetting a host: refused while machines are placed on it, as the API says; done for the new one
    hosts.filter(has_text="hv2").locator("button[data-action=forget]").click()
    page.click("dialog.confirm button[data-confirm]")
    expect(page.locator("#toasts .toast.error")).to_contain_text("has 2 machine(s) placed on it")
    hosts.filter(has_text="hv3").locator("button[data-action=forget]").click()
    page.click("dialog.confirm button[data-confirm]")
    expect(hosts.filter(has_text="hv3")).to_have_count(0)
    assert portal.api("GET", "/v1/hosts/hv3").status_code == 404

    viewer = browser.page()
    login(viewer, portal, portal.make_token("read-only", "viewer"))
    viewer.click("nav >> text=Infrastructure")
    expect(viewer.locator("#sites tbody tr", has_text="gamma")).to_be_visible()
    expect(viewer.locator("button[data-action=registration-key]")).to_have_count(0)
    expect(viewer.locator("#site-form")).to_have_count(0)
    expect(viewer.locator("#host-cloud-form")).to_have_count(0)
    expect(viewer.locator("button[data-action=forget]")).to_have_count(0)
