"""Settings in the browser: an admin creates a policy, a cloud, a pair and a mapping through the forms; the
API's validation errors are shown as the API words them and nothing is created; a read-only user gets no forms."""
from __future__ import annotations

from playwright.sync_api import expect

from .conftest import login


def _submit(page, form: str, **values) -> None:
    for name, value in values.items():
        field = page.locator(f"#{form} [name={name}]")
        if field.evaluate("e => e.tagName") == "SELECT":
            field.select_option(value)
        else:
            field.fill(value)
    page.click(f"#{form} button[type=submit]")


def test_settings_create_with_the_apis_validation(portal, browser):
    for site in ("alpha", "beta"):
        assert portal.api("POST", "/v1/sites", json={"name": site}).status_code == 201
    page = browser.page()
    login(page, portal, portal.admin_token)
    page.click("nav >> text=Settings")

    _submit(page, "policy-form", name="gold-policy", frequency="7m")
    error = page.locator("#policy-form .form-error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("frequency")
    api_says = portal.api("POST", "/v1/policies", json={"name": "gold-policy", "frequency": "7m"}).json()["error"]
    expect(error).to_have_text(api_says)
    assert portal.api("GET", "/v1/policies").json() == []

    _submit(page, "policy-form", name="gold-policy", frequency="15m", initial_method="scheduled")
    expect(error).to_contain_text("initial_at: missing")
    _submit(page, "policy-form", name="gold-policy", frequency="15m", initial_method="network",
            rpo_threshold="10s")
    expect(error).to_contain_text("from 30s to 24h")
    _submit(page, "policy-form", name="gold-policy", frequency="15m", initial_method="network",
            bandwidth_limit="100M", rpo_threshold="30m", copy_rate_when_busy="none")
    row = page.locator("#policies tbody tr", has_text="gold-policy")
    expect(row.locator("td[data-col=frequency]")).to_have_text("15 min")
    expect(row.locator("td[data-col=bandwidth_limit]")).to_have_text("100.0 MiB/s")
    expect(row.locator("td[data-col=rpo_threshold]")).to_have_text("30 min")
    expect(row.locator("td[data-col=copy_rate_when_busy]")).to_have_text("full speed")
    policy = portal.api("GET", "/v1/policies/gold-policy").json()
    assert (policy["frequency"], policy["bandwidth_limit"], policy["rpo_threshold"]) == (900, 100 * 2**20, 1800)
    assert policy["copy_rate_when_busy"] == 0

    _submit(page, "cloud-form", name="bad name!", site="alpha")
    expect(page.locator("#cloud-form .form-error")).to_contain_text("name: String should match pattern")
    _submit(page, "cloud-form", name="gold", site="alpha")
    expect(page.locator("#clouds tbody tr", has_text="gold")).to_contain_text("alpha")
    _submit(page, "cloud-form", name="gold-dr", site="beta")
    expect(page.locator("#clouds tbody tr", has_text="gold-dr")).to_contain_text("beta")

    _submit(page, "pair-form", name="gold-pair", primary="gold", recovery="gold", policy="gold-policy")
    expect(page.locator("#pair-form .form-error")).to_be_visible()
    _submit(page, "pair-form", name="gold-pair", primary="gold", recovery="gold-dr", policy="gold-policy")
    expect(page.locator("#pairs tbody tr", has_text="gold-pair")).to_contain_text("gold-policy")

    _submit(page, "storage-mapping-form", pair="gold-pair", source="relative/path", target="/srv/replica")
    expect(page.locator("#storage-mapping-form .form-error")).to_contain_text("source")
    _submit(page, "storage-mapping-form", pair="gold-pair", source="/var/lib/vms", target="/srv/replica")
    expect(page.locator("#storage-mappings tbody tr")).to_contain_text("/srv/replica")
    _submit(page, "network-mapping-form", pair="gold-pair", source="prod", target="dr-prod")
    expect(page.locator("#network-mappings tbody tr")).to_contain_text("dr-prod")
    pair = portal.api("GET", "/v1/pairs/gold-pair").json()
    assert [(x["source"], x["target"]) for x in pair["storage_mappings"]] == [("/var/lib/vms", "/srv/replica")]
    assert [(x["source"], x["target"]) for x in pair["network_mappings"]] == [("prod", "dr-prod")]

    # tokens: made here, shown once, usable at once; revoked here, refused at once
    page.fill("#token-form [name=name]", "night-shift")
    page.select_option("#token-form [name=role]", "operator")
    page.click("#token-form button[type=submit]")
    secret = page.locator("#new-token-secret").inner_text().strip()
    assert portal.api("GET", "/v1/whoami", secret).json() == {"name": "night-shift", "role": "operator"}
    page.locator("#tokens tbody tr", has_text="night-shift").locator("button[data-action=revoke]").click()
    page.click("dialog.confirm button[data-confirm]")
    expect(page.locator("#tokens tbody tr", has_text="night-shift").locator("td[data-col=revoked_at]")).not_to_have_text("no")
    assert portal.api("GET", "/v1/whoami", secret).status_code == 401
    expect(page.locator("#tokens tbody tr", has_text="admin").locator("button")).to_have_count(0)   # not itself
    expect(page.locator("#audit tbody tr", has_text="token/night-shift").first).to_contain_text("DELETE /v1/tokens/{name}")

    viewer = browser.page()
    login(viewer, portal, portal.make_token("read-only", "auditor"))
    viewer.click("nav >> text=Settings")
    expect(viewer.locator("#policies tbody tr", has_text="gold-policy")).to_be_visible()
    expect(viewer.locator("form.api-form")).to_have_count(0)
    expect(viewer.locator("button[data-action=delete]")).to_have_count(0)
    expect(viewer.locator("#tokens")).to_have_count(0)
    expect(viewer.locator("#audit tbody tr", has_text="POST /v1/policies").first).to_be_visible()
