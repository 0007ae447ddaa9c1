"""A libvirt domain whose disk protection pointed at the project's export (`replicator track serve`, NBD
over a Unix socket) boots and writes through it; the export is killed with SIGKILL mid-write and started
again: the domain pauses on the I/O error (error_policy='stop', libvirt 9.0 having no NBD reconnect),
`resume` carries it on once the export is back, and the guest never sees an I/O error. Then a clean
shutdown through the agent, every file intact in the VHDX, and the domain's original disk put back (while it
runs: from its next boot)."""
from __future__ import annotations

import contextlib
import os
import time
import xml.etree.ElementTree as ET

import pytest

from replicator.hypervisor import NEXT_BOOT, NOW, DiskSource

from ..guest.harness import MiB, make_disk_image, verify_image
from ..tracking.helpers import start_serve, stop_serve, tracked
from .conftest import log
from .helpers import console_of, primary_domain_xml, wait_state

pytestmark = pytest.mark.timeout(300)
FILES = 4


def test_domain_on_the_export_pauses_while_it_is_killed_and_resumes(hv, workdir, guest_boot):
    name = "web1"
    kernel, initrd = guest_boot
    disk = make_disk_image(f"{workdir}/web1.vhdx", 128 * MiB)
    tracked(disk).close()                                   # tracking established (initial copy behind us)
    original = f"{workdir}/web1.raw"                        # the disk as the operator defined it (libvirt 9.0
    with open(original, "wb") as f:                         # has no vhdx format: a raw file stands for it)
        f.truncate(128 * MiB)
    console = f"{workdir}/console.log"
    hv.conn.defineXML(primary_domain_xml(name, kernel, initrd, console, disks=[("vda", original, "raw")]))
    before = hv.domain_config(name)
    sock = f"{workdir}/nbd.sock"
    serve = start_serve([disk], sock)
    try:
        mode, originals = hv.point_disks_at_export(name, {"vda": (sock, "web1.vhdx")})
        assert mode == NOW
        t0 = time.monotonic()
        hv.start(name)
        con = console_of(hv, name, console)
        con.wait_for("GUEST_MOUNTED", 180)
        log(f"{name} booted on the export and mounted in {time.monotonic() - t0:.1f} s")
        con.wait_rounds(3, 120)

        at = con.rounds()
        serve.kill()                                        # SIGKILL mid-round
        serve.wait(30)
        killed = time.monotonic()
        stop_serve(serve, sig=9)
        st = wait_state(hv, name, lambda s: s.paused_on_io_error, 60, "pause on the I/O error")
        log(f"export killed at round {at}: domain {st.state} ({st.reason}) "
            f"{time.monotonic() - killed:.2f} s later")
        assert hv.resume(name) is False and hv.state(name).paused_on_io_error   # no export: pauses again
        time.sleep(1)
        assert hv.state(name).paused_on_io_error
        assert con.rounds() <= at + 1

        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)
        serve = start_serve([disk], sock)
        restarted = time.monotonic()
        assert hv.resume(name, timeout=30), f"still {hv.state(name)} 30 s after the export came back"
        log(f"running again {time.monotonic() - restarted:.1f} s after the export restarted")
        con.wait_rounds(at + 3, 120)
        log(f"round {at + 3} done {time.monotonic() - restarted:.1f} s after the restart")
        assert con.errors() == [], f"the guest saw errors: {con.errors()}\n{con.tail()}"

        # unprotecting a running domain: its definition is the operator's disk again from its next boot,
        # the running guest stays on the export
        assert hv.restore_disks(name, originals) == NEXT_BOOT
        assert hv.domain_config(name).disks == before.disks
        live = [d for d in ET.fromstring(hv.conn.lookupByName(name).XMLDesc(0)).iter("disk")][0]
        assert live.get("type") == "network" and live.find("source/host").get("socket") == sock

        t = time.monotonic()
        hv.shutdown(name, timeout=120, agent=True)
        con.wait_for("GUEST_UMOUNT_OK", 5)
        log(f"clean shutdown through the agent in {time.monotonic() - t:.1f} s after {con.rounds()} rounds")
        assert con.errors() == [], con.tail()
        rounds = con.rounds()
    except BaseException:
        if serve.poll() is None:
            stop_serve(serve, sig=9)
        raise
    finally:
        hv.destroy(name)
    stop_serve(serve)
    assert verify_image(disk) == FILES * rounds

    after = hv.domain_config(name)                          # shut off: the operator's disk again
    assert after.disks == before.disks and after.disk("vda").source == DiskSource.file(original, "raw")
    hv.undefine(name)
    assert not hv.exists(name)
