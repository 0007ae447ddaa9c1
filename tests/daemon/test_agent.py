"""replicatord run from a controller, over time: with 12-second host certificates, the agent renews before
expiry and the daemon's replica listener serves the new certificate (the reload picked it up); a host the
controller no longer knows says so in one line and keeps running what it had."""
from __future__ import annotations

import socket
import ssl
import time

from cryptography import x509

from ..controller.test_fleet import FleetHost, wait
from ..controller.test_host_channel import ControllerProc


def _served_serial(h: FleetHost) -> int:
    """The serial of the certificate the host's replica listener presents (a TLS handshake as the host)."""
    ctx = ssl.create_default_context(cafile=str(h.state / "controller" / "ca.pem"))
    ctx.load_cert_chain(str(h.state / "controller" / "host.pem"), str(h.state / "controller" / "host.key"))
    with socket.create_connection(("127.0.0.1", h.data), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number


def _serial(h: FleetHost) -> int:
    return x509.load_pem_x509_certificate((h.state / "controller" / "host.pem").read_bytes()).serial_number


def test_agent_renews_its_certificate_and_says_when_it_is_refused(tmp_path):
    ctl = ControllerProc(tmp_path, cert_lifetime=12).start()
    r1 = None
    try:
        for site in ("east", "west"):
            ctl.ok("POST", "/v1/sites", {"name": site})
        r1 = FleetHost(tmp_path, "r1", ctl, ctl.key_file(tmp_path, "west"))
        r1.start()
        wait(lambda: r1.api("GET", "/v1/status")["controller"]["state"] == "connected", "r1 up", [r1])
        ctl.ok("POST", "/v1/clouds", {"name": "gold", "site": "east"})
        ctl.ok("POST", "/v1/clouds", {"name": "gold-dr", "site": "west"})
        ctl.ok("PUT", "/v1/hosts/r1/cloud", {"cloud": "gold-dr"})
        ctl.ok("POST", "/v1/pairs", {"name": "gold-pair", "primary": "gold", "recovery": "gold-dr"})
        time.sleep(1)                  # no primary host in the pair yet: nothing to serve, no replica role
        assert r1.api("GET", "/v1/status")["replica"] is None
        p1 = FleetHost(tmp_path, "p1", ctl, ctl.key_file(tmp_path, "east"))
        p1.start()                     # registered, it is only a host of site east ...
        wait(lambda: len(ctl.ok("GET", "/v1/hosts")) == 2, "p1 registered", [r1, p1])
        p1.stop()
        squatter = socket.socket()                 # r1's data port taken: the revision with [replica] cannot start
        squatter.bind(("127.0.0.1", r1.data))
        squatter.listen()
        ctl.ok("PUT", "/v1/hosts/p1/cloud", {"cloud": "gold"})    # ... until it joins the primary cloud
        wait(lambda: r1.api("GET", "/v1/status")["controller"]["problems"], "the revision refused", [r1])
        st = r1.api("GET", "/v1/status")
        assert st["replica"] is None and "could not start" in st["controller"]["problems"][0], st
        failed = st["controller"]["latest_revision"]
        assert st["controller"]["revision"] < failed
        wait(lambda: (ctl.ok("GET", "/v1/hosts/r1")["applied_revision"] == st["controller"]["revision"]), "the "
             "report of the revision running again", [r1])
        squatter.close()
        time.sleep(1.5)                            # the failed revision is not tried again on its own ...
        assert r1.api("GET", "/v1/status")["replica"] is None
        ctl.ok("POST", "/v1/pairs/gold-pair/storage-mappings", {"source": "/srv", "target": str(tmp_path / "rs")})
        wait(lambda: r1.api("GET", "/v1/status")["replica"] is not None, "r1's replica listener", [r1])
        assert r1.api("GET", "/v1/status")["controller"]["revision"] > failed   # ... the next one is
        first = _serial(r1)
        assert _served_serial(r1) == first

        # renewed after 2/3 of 12 s; the listener restarts on the new certificate, the controller records it
        wait(lambda: _serial(r1) != first, "a renewal", [r1], timeout=30)
        wait(lambda: _served_serial(r1) == _serial(r1), "the listener on the new certificate", [r1])
        st = r1.api("GET", "/v1/status")["controller"]
        assert st["state"] == "connected" and st["certificate_not_after"] > st["renew_after"]
        host = ctl.ok("GET", "/v1/hosts/r1")
        assert host["cert_not_after"][:19] == st["certificate_not_after"][:19], (host, st)
        assert "certificate renewed" in r1.text()

        # removed through the controller's API: one line, and the replica role goes on
        assert ctl.ok("DELETE", "/v1/hosts/r1") == {}
        wait(lambda: r1.api("GET", "/v1/status")["controller"]["state"].startswith("refused: "), "the refusal", [r1])
        time.sleep(2)                                      # four more polls: still one line
        lines = [x for x in r1.text().splitlines() if "refuses this host" in x]
        assert len(lines) == 1 and "not registered here" in lines[0], lines
        assert r1.api("GET", "/v1/status")["replica"] is not None and r1.proc.poll() is None
        # restarted with the same key: it runs on its registration; with a new key it registers again
        r1.stop()
        r1.start()
        wait(lambda: r1.api("GET", "/v1/status")["controller"]["state"].startswith("refused: "), "still refused",
             [r1])
        assert "already registered with this key" in r1.text()
        r1.stop()
        r1.key = ctl.key_file(tmp_path, "west")
        r1.start()
        wait(lambda: r1.api("GET", "/v1/status")["controller"]["state"] == "connected", "registered again", [r1])
        assert ctl.ok("GET", "/v1/hosts/r1")["id"] == r1.api("GET", "/v1/status")["controller"]["host_id"]
    finally:
        if r1 is not None:
            r1.stop()
        ctl.stop()
