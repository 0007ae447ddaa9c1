"""An adversarial pass over the controller's REST API: values at the edges of what the database can hold,
bodies too large to read, and races between requests (forced on PostgreSQL by holding a row lock while
both requests queue behind it). Each test here failed before its fix; each refusal is one line."""
from __future__ import annotations

import pytest

from .helpers import ok, refused


@pytest.mark.parametrize("since", ["9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+23:59"])
def test_audit_since_out_of_range_once_in_utc_is_one_line(controller, since):
    # a valid ISO 8601 date-time whose UTC instant is past year 9999 or before year 1 was a 500
    refused(controller.client.get("/v1/audit", params={"since": since}), 422, "out of range")
    assert ok(controller.client.get("/v1/audit", params={"since": "2000-01-01T00:00:00-05:00"})) is not None


def test_a_body_over_the_limit_is_refused_before_it_is_read(controller):
    from replicator.controller.app import MAX_BODY
    c = controller.client
    big = {"token": "x", "hostname": "h", "csr": "A" * MAX_BODY, "admin_url": "http://127.0.0.1:1",
           "data_url": "https://h:1"}
    # the registration route answers anyone: before, it read and parsed any size (a 422 after the fact)
    refused(c.post("/v1/register", json=big), 413, "request body over")

    def chunks():                         # no Content-Length: counted as it comes
        for _ in range(MAX_BODY // 65536 + 2):
            yield b"A" * 65536
    refused(c.post("/v1/sites", content=chunks(), headers={"content-type": "application/json"}), 413)
    refused(c.post("/v1/sites", content=b"{}", headers={"content-length": "x"}), 413)
    assert ok(c.post("/v1/sites", json={"name": "east", "description": "d" * 1000}), 201)["name"] == "east"
    entry = ok(c.get("/v1/audit", params={"limit": 2}))[1]
    assert entry["action"].startswith("POST") and entry["outcome"].startswith("413"), entry


def test_a_cancel_does_not_overwrite_a_claim_made_after_it_read_the_job(store):
    """Cancel read a queued job, a worker claimed it meanwhile: the cancel was written over the claim (the
    worker ran a job shown as cancelled). Now the cancel becomes a request to that worker."""
    if store.dialect == "sqlite":
        pytest.skip("SQLite runs one transaction at a time (BEGIN IMMEDIATE): this interleaving cannot happen")
    from replicator.controller import jobs
    from replicator.controller import models as m
    with store.session() as s:
        job_id = jobs.enqueue(s, "plan-run", created_by="tests").id
        done_id = jobs.enqueue(s, "plan-run", created_by="tests").id
    with store.session() as s:
        job = s.get(m.Job, job_id)
        assert job.state == "queued"
        claimed = jobs.claim(store, "worker-1")               # another transaction, committed
        assert claimed is not None and claimed.id == job_id
        assert jobs.cancel(s, job, "operator") == "cancel requested"
    with store.session() as s:
        job = s.get(m.Job, job_id)
        assert (job.state, job.claimed_by, job.cancel_requested) == ("running", "worker-1", True)
    assert jobs.finish(store, job_id, "worker-1", "cancelled", "stopped on request")
    with store.session() as s:
        done = s.get(m.Job, done_id)
        assert jobs.claim(store, "worker-2").id == done_id and jobs.finish(store, done_id, "worker-2", "succeeded")
        with pytest.raises(ValueError, match="already succeeded"):
            jobs.cancel(s, done, "operator")
    with store.session() as s:
        assert s.get(m.Job, done_id).state == "succeeded"


def race(ctl, table: str, where: str, *requests):
    """Send `requests` (method, path, json) at once. On PostgreSQL they are made to interleave: a row of
    `table` is locked here until every request waits on a lock, so each has read what it decides on before
    any writes. SQLite runs one transaction at a time; there they are simply concurrent."""
    import threading
    import time

    from sqlalchemy import text
    results: list = [None] * len(requests)

    def send(i, method, path, body, headers=None):
        results[i] = ctl.client.request(method, path, json=body, headers=headers)
    threads = [threading.Thread(target=send, args=(i, *r)) for i, r in enumerate(requests)]
    if ctl.store.dialect != "postgresql":
        for t in threads:
            t.start()
    else:
        with ctl.store.engine.connect() as holder:
            holder.execute(text(f"SELECT 1 FROM {table} WHERE {where} FOR UPDATE"))
            for t in threads:
                t.start()
            waiting, deadline = 0, time.monotonic() + 30
            while waiting < len(requests) and time.monotonic() < deadline:
                time.sleep(0.05)
                holder.execute(text("SELECT pg_stat_clear_snapshot()"))   # else read once per transaction
                waiting = holder.execute(text(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND datname = current_database() AND pid <> pg_backend_pid()")).scalar()
            assert waiting == len(requests), f"only {waiting} of {len(requests)} requests queued on the lock"
            holder.rollback()
    for t in threads:
        t.join(60)
    return results


def statuses(results) -> list[int]:
    for r in results:
        assert r.status_code < 500 and (not r.content or set(r.json()) == {"error"} or r.status_code < 300), r.text
    return sorted(r.status_code for r in results)


def test_two_pairs_racing_for_one_cloud_make_one_pair(controller):
    """Two pairs naming the same primary cloud: both read it unpaired and both were made (the cloud then
    belonged to the second; the first pair had lost its primary cloud)."""
    c = controller.client
    for site in ("a", "b", "c"):
        ok(c.post("/v1/sites", json={"name": site}), 201)
    for cloud, site in (("gold", "a"), ("silver", "b"), ("bronze", "c")):
        ok(c.post("/v1/clouds", json={"name": cloud, "site": site}), 201)
    results = race(controller, "clouds", "name = 'gold'",
                   ("POST", "/v1/pairs", {"name": "x", "primary": "gold", "recovery": "silver"}),
                   ("POST", "/v1/pairs", {"name": "y", "primary": "gold", "recovery": "bronze"}))
    assert statuses(results) == [201, 409], [r.text for r in results]
    pairs = ok(c.get("/v1/pairs"))
    assert len(pairs) == 1 and pairs[0]["primary"] == "gold", pairs
    # the reverse orders lock both clouds in one order: no deadlock (a 503), one pair
    ok(c.delete(f"/v1/pairs/{pairs[0]['name']}"), 204)
    results = race(controller, "clouds", "name = 'silver'",
                   ("POST", "/v1/pairs", {"name": "x", "primary": "gold", "recovery": "silver"}),
                   ("POST", "/v1/pairs", {"name": "z", "primary": "silver", "recovery": "gold"}))
    assert statuses(results) == [201, 409], [r.text for r in results]


def test_a_machine_action_racing_itself_is_done_once(controller):
    """Two pauses of one machine: both read 'enabled' and both made a pause job."""
    from .helpers import deployment
    deployment(controller)
    ok(controller.client.post("/v1/machines", json={"name": "vm1", "cloud": "gold", "primary_host": "pa1",
                                                    "domain": "vm1"}), 201)
    results = race(controller, "machines", "name = 'vm1'", ("POST", "/v1/machines/vm1/pause", None),
                   ("POST", "/v1/machines/vm1/pause", None))
    assert statuses(results) == [202, 409], [r.text for r in results]
    assert len(ok(controller.client.get("/v1/jobs", params={"kind": "pause-protection"}))) == 1


def test_one_run_of_a_plan_at_a_time_even_when_two_start_together(controller):
    from .helpers import deployment
    deployment(controller)
    c = controller.client
    ok(c.post("/v1/machines", json={"name": "vm1", "cloud": "gold", "primary_host": "pa1", "domain": "vm1"}), 201)
    ok(c.post("/v1/plans", json={"name": "pl", "pair": "gold-silver", "groups": [{"members": ["vm1"]}]}), 201)
    results = race(controller, "recovery_plans", "name = 'pl'", ("POST", "/v1/plans/pl/runs", {"kind": "test"}),
                   ("POST", "/v1/plans/pl/runs", {"kind": "test"}))
    assert statuses(results) == [202, 409], [r.text for r in results]
    assert len(ok(c.get("/v1/plans/pl/runs"))) == 1


# The role each route needs: a route added without a line here fails the test below (decide its role first).
READ, OPERATE, ADMIN, HOST, PUBLIC = "read-only", "operator", "admin", "host certificate", "public"
ROLE_OF = {
    ("GET", "/v1/tokens"): ADMIN, ("GET", "/v1/ca"): PUBLIC, ("POST", "/v1/register"): PUBLIC,
    ("GET", "/v1/hosts/self/desired"): HOST, ("POST", "/v1/hosts/self/report"): HOST,
    ("POST", "/v1/hosts/self/renew"): HOST,
    **{("POST", f"/v1/machines/{{name}}/{a}"): OPERATE
       for a in ("pause", "resume", "resync", "disable", "enable", "failover", "commit-failover",
                 "cancel-failover", "cleanup-test-failover", "reverse", "failback")},
    ("POST", "/v1/machines"): OPERATE, ("PATCH", "/v1/machines/{name}"): OPERATE,
    ("DELETE", "/v1/machines/{name}"): OPERATE, ("POST", "/v1/jobs/{job_id}/cancel"): OPERATE,
    ("POST", "/v1/plans/{name}/runs"): OPERATE, ("POST", "/v1/plan-runs/{run_id}/confirm"): OPERATE,
}
ADMIN_CHANGES = ("/v1/sites", "/v1/hosts/{host}", "/v1/clouds", "/v1/pairs", "/v1/policies", "/v1/plans",
                 "/v1/tokens")


def _role(method: str, path: str) -> str:
    if (method, path) in ROLE_OF:
        return ROLE_OF[method, path]
    if method == "GET":
        return READ
    assert path.startswith(ADMIN_CHANGES), f"{method} {path}: which role may do this? (add it to ROLE_OF)"
    return ADMIN


def test_every_route_refuses_missing_bad_revoked_and_too_low_tokens(controller):
    from fastapi.testclient import TestClient
    c = TestClient(controller.app)                          # no default token
    tokens = {role: controller.make_token(role, f"t-{role}") for role in ("read-only", "operator", "admin")}
    revoked = controller.make_token("admin", "gone")
    ok(controller.client.delete("/v1/tokens/gone"), 204)
    rank = ["read-only", "operator", "admin"]
    routes = [(meth.upper(), path) for path, ops in controller.app.openapi()["paths"].items() for meth in ops]
    routes.append(("GET", "/v1/events"))                    # out of the document (an endless stream)
    assert len(routes) > 50
    fill = {"{name}": "x", "{host}": "x", "{site}": "x", "{job_id}": "1", "{run_id}": "1", "{mapping_id}": "1"}
    for method, template in routes:
        path = template
        for k, v in fill.items():
            path = path.replace(k, v)
        need = _role(method, template)
        send = lambda auth: c.request(method, path, headers={"Authorization": auth} if auth else {})  # noqa: E731
        if need == PUBLIC:
            assert send("").status_code not in (401, 403) or template == "/v1/register", (method, path)
            continue
        if need == HOST:                               # API tokens are not host certificates
            for auth in ("", f"Bearer {tokens['admin']}"):
                refused(send(auth), 401, "client certificate")
            continue
        for auth in ("", "Bearer", "Bearer rpc_" + "A" * 43, f"Bearer {revoked}", f"Basic {tokens['admin']}",
                     "Bearer " + tokens["admin"][:-1]):
            r = send(auth)
            assert r.status_code == 401 and r.headers.get("www-authenticate") == "Bearer", (method, path, auth)
            refused(r, 401)
        for role in rank[:rank.index(need)]:
            refused(send(f"Bearer {tokens[role]}"), 403, f"needs {need}")
        if template != "/v1/events":
            for role in rank[rank.index(need):]:
                r = send(f"Bearer {tokens[role]}")
                assert r.status_code not in (401, 403, 500), (method, path, role, r.text)


# ------------------------------------------------------------------------------ the host channel (hosts_api.py)
def _registered(controller, tmp_path, hostname="h1", site="east"):
    from replicator.daemon.enrol import HostFiles
    c = controller.client
    if c.get(f"/v1/sites/{site}").status_code == 404:
        ok(c.post("/v1/sites", json={"name": site}), 201)
    key = ok(c.post(f"/v1/sites/{site}/registration-keys"))
    body = {"token": key["token"], "hostname": hostname, "csr": HostFiles(str(tmp_path / hostname)).csr(hostname),
            "admin_url": "http://127.0.0.1:8085", "data_url": f"https://{hostname}.example:8084"}
    return ok(c.post("/v1/register", json=body)), body


def _as_host(controller, pem: str):
    """The app as the TLS layer hands it a request with this verified client certificate (tls.py)."""
    from fastapi.testclient import TestClient

    async def with_cert(scope, receive, send):
        if scope["type"] == "http":
            scope.setdefault("extensions", {})["tls"] = {"client_cert_chain": [pem]}
        await controller.app(scope, receive, send)
    return TestClient(with_cert)


def test_a_number_beyond_what_the_store_holds_is_one_line(controller, tmp_path):
    """A report's revision of 2**63 was a 500 on SQLite (the driver's OverflowError). The app now answers any
    such overflow with a 422; hosts_api.py's owner should still bound ReportIn.revision (le=2**31-1)."""
    issued, _ = _registered(controller, tmp_path)
    host = _as_host(controller, issued["certificate"])
    for revision in (2 ** 63, 10 ** 30):
        refused(host.post("/v1/hosts/self/report", json={"revision": revision, "status": {}}), 422)
    assert ok(host.post("/v1/hosts/self/report", json={"revision": 1, "status": {}}))["revision"] >= 1


def test_a_removed_host_does_not_join_again_with_its_used_key(controller, tmp_path):
    issued, body = _registered(controller, tmp_path)
    ok(controller.client.delete("/v1/hosts/h1"), 204)
    # docs/management-plane.md and DELETE /v1/hosts: "it joins again only with a new key"
    refused(controller.client.post("/v1/register", json=body), 403, "already used")


def test_a_machine_enabled_while_its_pair_is_deleted_is_not_left_in_an_unpaired_cloud(controller):
    """Enabling read the cloud paired while deleting the pair counted no machines: both succeeded, and the
    machine stayed protected in a cloud without a pair (no recovery side, no policy)."""
    from .helpers import deployment
    deployment(controller)
    c = controller.client
    results = race(controller, "clouds", "name = 'gold'",
                   ("POST", "/v1/machines", {"name": "vm1", "cloud": "gold", "primary_host": "pa1",
                                             "domain": "vm1"}),
                   ("DELETE", "/v1/pairs/gold-silver", None))
    codes = [r.status_code for r in results]
    assert all(code < 500 for code in codes), [r.text for r in results]
    pairs, machines = ok(c.get("/v1/pairs")), ok(c.get("/v1/machines"))
    if codes[1] == 204:                                       # the pair went first: nothing enabled in gold
        assert codes[0] == 422 and pairs == [] and machines == [], [r.text for r in results]
    else:                                                     # the machine went first: the pair stays
        assert codes == [201, 409] and len(pairs) == 1 and machines[0]["cloud"] == "gold", codes


def test_no_secret_in_any_answer_audit_entry_or_log_line(controller, tmp_path, caplog):
    """Tokens, registration keys and the CA key appear only where they are made (once), never in a listing,
    the audit log, an error or a log line -- also when a request carrying them is refused."""
    import logging
    import os
    caplog.set_level(logging.DEBUG)
    c = controller.client
    made = ok(c.post("/v1/tokens", json={"name": "ops", "role": "operator"}), 201)["token"]
    issued, body = _registered(controller, tmp_path)
    key_token = body["token"]
    with open(os.path.join(controller.data_dir, "ca", "ca.key")) as f:
        ca_key = "".join(f.read().split("-----")[2].split())[:40]           # a stretch of the key's base64
    refused(c.post("/v1/register", json={**body, "hostname": "other"}), 403)     # the key again: refused
    refused(c.get("/v1/sites", headers={"Authorization": f"Bearer {made}x"}), 401)
    ok(c.delete("/v1/tokens/ops"), 204)
    refused(c.get("/v1/sites", headers={"Authorization": f"Bearer {made}"}), 401)
    secrets = {"admin token": controller.token, "made token": made, "registration key": key_token,
               "CA key": ca_key}
    from replicator.controller.auth import hash_token
    secrets.update({f"hash of {k}": hash_token(v) for k, v in list(secrets.items()) if k != "CA key"})
    seen = []
    for path in ("/v1/tokens", "/v1/audit?limit=1000", "/v1/hosts", "/v1/sites", "/v1/hosts/h1",
                 "/openapi.json", "/metrics", "/v1/whoami"):
        seen.append((path, c.get(path).text))
    seen += [("log", r.getMessage()) for r in caplog.records]
    for where, text in seen:
        for what, secret in secrets.items():
            assert secret not in text, f"{what} in {where}"


def test_cli_against_bad_urls_tokens_and_servers_says_one_line(tmp_path, capsys):
    """Each of these was a traceback: a token file with a line break inside, a URL that does not parse, a
    server that does not speak HTTP, one that answers 200 with something else than JSON."""
    import socket
    import threading

    from replicator.cli import main as cli
    good, broken = tmp_path / "t", tmp_path / "broken"
    good.write_text("rpc_abc\n")
    broken.write_text("rpc_a\nbc\n")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    answers = [b"garbage\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"]

    def serve():
        for answer in answers:
            conn, _ = listener.accept()
            conn.recv(65536)
            conn.sendall(answer)
            conn.close()
    server = threading.Thread(target=serve, daemon=True)
    server.start()
    url = "http://127.0.0.1:%d" % listener.getsockname()[1]
    try:
        for argv, code, words in (
                (["--controller", "http://127.0.0.1:1", "--token", str(broken)], 2, "does not hold an API token"),
                (["--controller", "http://[::1", "--token", str(good)], 2, "--controller"),
                (["--controller", "ftp://x", "--token", str(good)], 2, "http(s)://HOST"),
                (["--controller", url, "--token", str(good)], 1, "does not answer as the controller"),
                (["--controller", url, "--token", str(good)], 1, "not JSON")):
            assert cli([*argv, "site", "list"]) == code, argv
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and words in err and "Traceback" not in err, (argv, err)
    finally:
        server.join(10)
        listener.close()


def _sans(pem: str) -> set[str]:
    from cryptography import x509
    cert = x509.load_pem_x509_certificate(pem.encode())
    return {str(n.value) for n in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value}


def test_a_host_cannot_get_a_certificate_for_the_controllers_or_another_hosts_name(controller, tmp_path):
    """Agents verify the controller by host name against the deployment CA (enrol.py), and primaries verify a
    replica host by its data_url's name: a CA-signed certificate naming either, with server usage, lets a
    registered host stand in for them (serve other hosts a desired configuration of its choosing)."""
    controller.app.state.ca.server_certificate(["127.0.0.1", "controller.example"])
    first, _ = _registered(controller, tmp_path, "h1")
    assert "h1.example" in _sans(first["certificate"])
    from replicator.daemon.enrol import HostFiles
    c = controller.client
    for hostname, data_url in (("h2", "https://controller.example:8084"), ("h3", "https://h1.example:8084"),
                               ("controller.example", "https://h4.example:8084")):
        key = ok(c.post("/v1/sites/east/registration-keys"))
        r = c.post("/v1/register", json={"token": key["token"], "hostname": hostname,
                                         "csr": HostFiles(str(tmp_path / hostname)).csr(hostname),
                                         "admin_url": "http://127.0.0.1:8085", "data_url": data_url})
        refused(r, 409, "registration refused")
    assert len(ok(c.get("/v1/hosts"))) == 1                       # nothing made by the refusals
    # an address is no one's: hosts on one machine share 127.0.0.1 (the loopback deployments of the tests)
    for hostname in ("h5", "h6"):
        key = ok(c.post("/v1/sites/east/registration-keys"))
        ok(c.post("/v1/register", json={"token": key["token"], "hostname": hostname,
                                        "csr": HostFiles(str(tmp_path / hostname)).csr(hostname),
                                        "admin_url": "http://127.0.0.1:8085", "data_url": "https://127.0.0.1:8084"}))


def test_two_admins_revoking_each_other_at_once_leave_one_admin(controller):
    a1, a2 = controller.make_token("admin", "a1"), controller.make_token("admin", "a2")
    results = race(controller, "api_tokens", "name IN ('a1', 'a2')",
                   ("DELETE", "/v1/tokens/a2", None, {"Authorization": f"Bearer {a1}"}),
                   ("DELETE", "/v1/tokens/a1", None, {"Authorization": f"Bearer {a2}"}))
    assert statuses(results) == [204, 401], [r.text for r in results]
    tokens = {t["name"]: t["revoked_at"] for t in ok(controller.client.get("/v1/tokens"))}
    assert [tokens["a1"], tokens["a2"]].count(None) == 1, tokens


def test_a_hostname_that_looks_like_another_hosts_id_does_not_take_its_place(controller):
    """A registering host picks its hostname: one named after another host's id was what GET/PUT
    /v1/hosts/ID (and a machine's primary_host) found when its row came first."""
    from replicator.controller import models as m
    victim_id = "f" * 32
    with controller.store.session() as s:
        site = m.Site(name="a")
        s.add(site)
        s.flush()
        s.add(m.Host(id="e" * 32, hostname=victim_id, site_id=site.id))        # the impostor, first
        s.flush()
        s.add(m.Host(id=victim_id, hostname="victim", site_id=site.id))
    c = controller.client
    ok(c.post("/v1/clouds", json={"name": "gold", "site": "a"}), 201)
    assert ok(c.get(f"/v1/hosts/{victim_id}"))["hostname"] == "victim"
    assert ok(c.put(f"/v1/hosts/{victim_id}/cloud", json={"cloud": "gold"}))["hostname"] == "victim"
    assert ok(c.get("/v1/clouds/gold"))["hosts"] == ["victim"]
    refused(c.get(f"/v1/hosts/{victim_id}/report"), 404, "host victim has not reported")
    ok(c.put(f"/v1/hosts/{victim_id}/cloud", json={"cloud": None}))
    ok(c.delete(f"/v1/hosts/{victim_id}"), 204)
    assert [h["hostname"] for h in ok(c.get("/v1/hosts"))] == [victim_id]      # the impostor is what is left


def test_same_name_created_twice_at_once_is_one_201_and_one_409(controller):
    c = controller.client
    ok(c.post("/v1/sites", json={"name": "a"}), 201)
    results = race(controller, "sites", "name = 'a'", ("POST", "/v1/clouds", {"name": "gold", "site": "a"}),
                   ("POST", "/v1/clouds", {"name": "gold", "site": "a"}))
    assert statuses(results) == [201, 409], [r.text for r in results]
    assert [x["name"] for x in ok(c.get("/v1/clouds"))] == ["gold"]


def test_the_audit_log_cannot_be_changed_through_the_api(controller):
    c = controller.client
    ok(c.post("/v1/sites", json={"name": "a"}), 201)
    before = ok(c.get("/v1/audit"))
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        refused(c.request(method, "/v1/audit", json={"actor": "nobody"}), 405)
        refused(c.request(method, f"/v1/audit/{before[0]['id']}"), 404)
    after = ok(c.get("/v1/audit", params={"limit": 1000}))
    assert after[-len(before):] == before                      # only grown (by the refusals, recorded)
    assert {a["outcome"][:3] for a in after[:-len(before)]} <= {"405", "404"}


def test_a_host_taken_out_of_its_cloud_while_a_machine_is_placed_on_it(controller):
    """Enabling read pa1 in gold while taking pa1 out of gold counted no machine on it: both succeeded and
    the machine ran on a host outside its cloud."""
    from .helpers import deployment
    deployment(controller)
    c = controller.client
    results = race(controller, "hosts", "hostname = 'pa1'",
                   ("POST", "/v1/machines", {"name": "vm1", "cloud": "gold", "primary_host": "pa1",
                                             "domain": "vm1"}),
                   ("PUT", "/v1/hosts/pa1/cloud", {"cloud": None}))
    codes = [r.status_code for r in results]
    assert codes in ([201, 409], [422, 200]), [r.text for r in results]
    for x in ok(c.get("/v1/machines")):
        assert x["primary_host"] in ok(c.get(f"/v1/clouds/{x['cloud']}"))["hosts"], x


def test_a_report_nested_too_deep_is_refused_before_it_breaks_reading_it(controller, tmp_path):
    """A host's report 500 levels deep was stored, and GET /v1/hosts/HOST/report was then a 500 for everyone
    (the response could not be serialized)."""
    issued, _ = _registered(controller, tmp_path)
    host = _as_host(controller, issued["certificate"])
    J = {"content-type": "application/json"}
    for field, doc in (("status", '{"x": %s}'), ("jobs", '[{"x": %s}]'), ("operations", '{"vm": {"x": %s}}')):
        deep = doc % ("[" * 500 + "]" * 500)
        body = '{"revision": 1, "status": {}, "%s": %s}' % (field, deep)
        refused(host.post("/v1/hosts/self/report", content=body, headers=J), 422, "nests deeper")
    fine = {"revision": 1, "status": {"machines": [{"name": "vm", "stats": {"a": {"b": [[1, 2], {"c": None}]}}}]}}
    ok(host.post("/v1/hosts/self/report", json=fine))
    assert ok(controller.client.get("/v1/hosts/h1/report"))["status"] == fine["status"]


def test_a_report_with_a_lone_surrogate_is_refused_before_it_breaks_reading_it(controller, tmp_path):
    """A string "\\ud800" (valid JSON, not Unicode) in a report was stored, and GET /v1/hosts/HOST/report was
    then a 500 for every reader."""
    issued, _ = _registered(controller, tmp_path)
    host = _as_host(controller, issued["certificate"])
    J = {"content-type": "application/json"}
    for body in ('{"revision": 1, "status": {"x": "\\ud800"}}', '{"revision": 1, "status": {"\\udfff": 1}}',
                 '{"revision": 1, "status": {"machines": [{"name": "vm", "state": "\\ud800"}]}}',
                 '{"revision": 1, "status": {}, "problems": ["\\ud800"]}',
                 '{"revision": 1, "status": {}, "jobs": [{"error": "\\ud800"}]}'):
        refused(host.post("/v1/hosts/self/report", content=body, headers=J), 422, "nicode")   # typed: pydantic's
    ok(host.post("/v1/hosts/self/report", content='{"revision": 1, "status": {"x": "caf\\u00e9 \\ud83d\\ude00"}}',
                 headers=J))
    assert ok(controller.client.get("/v1/hosts/h1/report"))["status"] == {"x": "café \U0001F600"}
