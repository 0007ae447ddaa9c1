"""The console over a real fleet: `replicator-controller` (HTTPS, its own CA) and two real replicatord hosts
registered with keys. A machine protected from the Replicated items page goes through its initial replication
to Replicating / Normal on screen without reload, its replica host's recovery points on its page; paused from
its page, the host's report shows it Suspended, then Warning past the policy's RPO threshold, resumed,
Replicating / Normal again; a resync's job follows the host's
to 100 % -- every step an API call the host carries out and reports."""
from __future__ import annotations

import os
import re

from playwright.sync_api import expect

from replicator.vhdx import create_vhdx

from ..controller.test_fleet import FleetHost, wait
from ..controller.test_host_channel import ControllerProc
from .conftest import login

MiB = 1 << 20


def test_protect_pause_resume_on_a_real_fleet(tmp_path, browser):
    ctl = ControllerProc(tmp_path, cert_lifetime=3600).start()
    hosts: list[FleetHost] = []
    try:
        for site in ("east", "west"):
            ctl.ok("POST", "/v1/sites", {"name": site})
        p1 = FleetHost(tmp_path, "p1", ctl, ctl.key_file(tmp_path, "east"))
        r1 = FleetHost(tmp_path, "r1", ctl, ctl.key_file(tmp_path, "west"))
        hosts += [p1, r1]
        (p1.dir / "disks").mkdir()
        disk = p1.dir / "disks" / "vm01-os.vhdx"
        with create_vhdx(str(disk), 16 * MiB, block_size=MiB) as d:
            d.write(0, b"\x5a" * MiB)
            d.write(8 * MiB, os.urandom(2 * MiB))
        for h in hosts:
            h.start()
        wait(lambda: len(ctl.ok("GET", "/v1/hosts")) == 2, "two hosts registered", hosts)
        ctl.ok("POST", "/v1/clouds", {"name": "gold", "site": "east"})
        ctl.ok("POST", "/v1/clouds", {"name": "gold-dr", "site": "west"})
        ctl.ok("PUT", "/v1/hosts/p1/cloud", {"cloud": "gold"})
        ctl.ok("PUT", "/v1/hosts/r1/cloud", {"cloud": "gold-dr"})
        # cycles every 30 s, and a short RPO threshold: a paused machine turns Warning within the test
        ctl.ok("POST", "/v1/policies", {"name": "fast", "frequency": "30s", "rpo_threshold": "45s"})
        ctl.ok("POST", "/v1/pairs", {"name": "gold-pair", "primary": "gold", "recovery": "gold-dr", "policy": "fast"})
        ctl.ok("POST", "/v1/pairs/gold-pair/storage-mappings",
               {"source": str(tmp_path), "target": str(tmp_path / "r1" / "replica-store")})

        page = browser.page()
        login(page, ctl, ctl.token)
        expect(page.locator("#who")).to_have_text("admin (admin)")
        page.click("nav >> text=Infrastructure")
        expect(page.locator("#hosts tbody tr", has_text="p1").locator("[data-up]")).to_have_attribute("data-up", "1")
        page.click("nav >> text=Replicated items")
        page.fill("#enable-form [name=name]", "vm01")
        page.select_option("#enable-form [name=cloud]", "gold")
        page.select_option("#enable-form [name=primary_host]", "p1")
        page.fill("#enable-form [name=disks]", str(disk))
        page.click("#enable-form button[type=submit]")
        row = page.locator("#items tbody tr", has_text="vm01")
        expect(row.locator("td[data-col=replica_host]")).to_have_text("r1")
        page.evaluate("window.__same_document = true")
        # the hosts apply their new configuration, copy the disk, and report: the row follows
        expect(row.locator("td[data-col=state]")).to_have_text("Replicating", timeout=120_000)
        expect(row.locator("td[data-col=health]")).to_have_text("Normal", timeout=60_000)
        expect(row.locator("td[data-col=last_success]")).to_contain_text("ago")
        assert page.evaluate("window.__same_document") is True

        row.locator("td[data-col=name] a").click()
        expect(page.locator("#machine-state")).to_have_text("Replicating")
        # the primary's own report, as it sent it: the initial copy counted, nothing pending, no problem
        assert p1.machine("vm01")["stats"]["successful_cycles"] >= 1
        expect(page.locator("#machine-cycles")).to_contain_text("0 failed")
        expect(page.locator("#machine-cycles")).not_to_contain_text("0 succeeded")
        expect(page.locator("#health-reasons")).to_have_text("No health problem reported.")
        expect(page.locator("#machine-reported")).to_contain_text("Reported byp1, ")
        # the primary's reports are the controller's RPO samples; the replica host's agent reports the machine's
        # recovery points (its replica site's view of the store), and the page shows them
        # (the first, from the initial replication, has no RPO yet; the change is sampled within CHANGE_GAP)
        wait(lambda: any(x["rpo_seconds"] is not None and x["state"] == "Replicating"
                         for x in ctl.ok("GET", "/v1/machines/vm01/history")["samples"]), "vm01's RPO sampled", hosts)
        assert any(x["cycle_seconds"] is not None and x["cycle_seconds"] >= 0      # the host reports its cycles'
                   for x in ctl.ok("GET", "/v1/machines/vm01/history")["samples"])  # durations too
        wait(lambda: ctl.ok("GET", "/v1/machines/vm01/points")["points"], "r1 reports vm01's points", hosts)
        # the page refreshes its points every 15 s: it may still show an earlier report of none ("0 recovery
        # points on r1"), so wait for one that has some
        expect(page.locator("#points-summary")).to_have_text(re.compile(r"^[1-9]\d* recovery points? on r1, reported"),
                                                            timeout=40_000)
        expect(page.locator("#machine-point-table tbody tr").first.locator("td[data-col=consistency]")).to_have_text(
            "crash")
        page.click("#machine-actions button[data-action=pause]")
        page.click("dialog.confirm button[data-confirm]")
        expect(page.locator("#machine-desired")).to_have_text("paused")
        expect(page.locator("#machine-state")).to_have_text("Suspended", timeout=60_000)
        jobs = page.locator("#machine-job-table tbody tr", has_text="pause-protection")
        expect(jobs.locator("td[data-col=state]")).to_have_text("succeeded", timeout=30_000)
        assert p1.machine("vm01")["state"] == "Suspended"
        # nothing replicates while paused: past the policy's RPO threshold the host reports Warning, with why
        expect(page.locator("#machine-health")).to_have_text("Warning", timeout=150_000)
        expect(page.locator("#health-reasons")).to_contain_text("over the RPO threshold of 45 seconds")

        page.click("#machine-actions button[data-action=resume]")
        page.click("dialog.confirm button[data-confirm]")
        expect(page.locator("#machine-state")).to_have_text("Replicating", timeout=60_000)
        expect(page.locator("#machine-health")).to_have_text("Normal", timeout=90_000)
        assert p1.machine("vm01")["state"] == "Replicating"

        # a resync: the host runs its own job and the controller's follows it on screen, to 100 %
        page.click("#machine-actions button[data-action=resync]")
        page.click("dialog.confirm button[data-confirm]")
        resync = page.locator("#machine-job-table tbody tr", has_text="resync")
        expect(resync.locator("td[data-col=state]")).to_have_text("succeeded", timeout=90_000)
        expect(resync.locator("td[data-col=progress]")).to_have_text("100%")
        expect(page.locator("#machine-state")).to_have_text("Replicating", timeout=60_000)
    finally:
        for tab in browser.context.pages:      # before the controller goes: its event streams end cleanly
            tab.close()
        for h in hosts:
            h.stop()
        ctl.stop()
