"""Sites, clouds, pairs, mappings, hosts and policies through the REST API, on SQLite and PostgreSQL."""
from __future__ import annotations

from .helpers import add_host, deployment, ok, refused


def test_sites_and_clouds_crud(controller):
    c = controller.client
    assert ok(c.get("/v1/sites")) == []
    site = ok(c.post("/v1/sites", json={"name": "a", "description": "Primary DC"}), 201)
    assert site["name"] == "a" and site["description"] == "Primary DC"
    refused(c.post("/v1/sites", json={"name": "a"}), 409, "site 'a' already exists")
    refused(c.post("/v1/sites", json={"name": "bad name"}), 422, "name:")
    refused(c.post("/v1/sites", json={"name": "a2", "colour": "red"}), 422, "colour")
    refused(c.post("/v1/sites", json={"name": "x", "description": "nul\x00"}), 422, "NUL")
    assert ok(c.get("/v1/sites/a"))["id"] == site["id"]
    refused(c.get("/v1/sites/zz"), 404, "no site 'zz'")

    ok(c.post("/v1/clouds", json={"name": "gold", "site": "a"}), 201)
    refused(c.post("/v1/clouds", json={"name": "gold", "site": "a"}), 409, "already exists")
    refused(c.post("/v1/clouds", json={"name": "iron", "site": "nowhere"}), 422, "site: no site 'nowhere'")
    assert [x["name"] for x in ok(c.get("/v1/clouds"))] == ["gold"]
    refused(c.delete("/v1/sites/a"), 409, "still has clouds")
    assert c.delete("/v1/clouds/gold").status_code == 204
    refused(c.get("/v1/clouds/gold"), 404)
    assert c.delete("/v1/sites/a").status_code == 204
    assert ok(c.get("/v1/sites")) == []


def test_a_cloud_belongs_to_one_pair_only(controller):
    c = controller.client
    for site in ("a", "b"):
        ok(c.post("/v1/sites", json={"name": site}), 201)
    for name, site in (("gold", "a"), ("gold2", "a"), ("silver", "b"), ("bronze", "b")):
        ok(c.post("/v1/clouds", json={"name": name, "site": site}), 201)
    pair = ok(c.post("/v1/pairs", json={"name": "p1", "primary": "gold", "recovery": "silver"}), 201)
    assert (pair["primary"], pair["recovery"], pair["policy"]) == ("gold", "silver", None)
    # the recovery cloud of p1 cannot be the primary (or recovery) of another pair, nor gold
    refused(c.post("/v1/pairs", json={"name": "p2", "primary": "gold2", "recovery": "silver"}), 409,
            "cloud 'silver' is already in pair 'p1'")
    refused(c.post("/v1/pairs", json={"name": "p3", "primary": "gold", "recovery": "bronze"}), 409,
            "cloud 'gold' is already in pair 'p1'")
    refused(c.post("/v1/pairs", json={"name": "p4", "primary": "gold2", "recovery": "gold2"}), 422, "itself")
    refused(c.post("/v1/pairs", json={"name": "p5", "primary": "silver", "recovery": "gold2"}), 409, "already in pair")
    refused(c.post("/v1/pairs", json={"name": "p6", "primary": "gold2", "recovery": "gold"}), 422, "another site")
    refused(c.post("/v1/pairs", json={"name": "p1", "primary": "gold2", "recovery": "bronze"}), 409, "exists")
    clouds = {x["name"]: (x["pair"], x["pair_role"]) for x in ok(c.get("/v1/clouds"))}
    assert clouds == {"gold": ("p1", "primary"), "silver": ("p1", "recovery"), "gold2": (None, None),
                      "bronze": (None, None)}
    refused(c.delete("/v1/clouds/gold"), 409, "in pair 'p1'")
    assert c.delete("/v1/pairs/p1").status_code == 204
    ok(c.post("/v1/pairs", json={"name": "p2", "primary": "gold2", "recovery": "silver"}), 201)


def test_mappings_and_policy_association(controller):
    c = controller.client
    hosts = deployment(controller)
    before = {h["hostname"]: h["desired_revision"] for h in ok(c.get("/v1/hosts"))}
    pair = ok(c.post("/v1/pairs/gold-silver/network-mappings", json={"source": "prod", "target": "dr"}), 201)
    assert [(x["source"], x["target"]) for x in pair["network_mappings"]] == [("prod", "dr")]
    refused(c.post("/v1/pairs/gold-silver/network-mappings", json={"source": "prod", "target": "x"}), 409,
            "already maps 'prod'")
    pair = ok(c.post("/v1/pairs/gold-silver/storage-mappings", json={"source": "/vm", "target": "/replica"}), 201)
    refused(c.post("/v1/pairs/gold-silver/storage-mappings", json={"source": "vm", "target": "/r"}), 422, "source")
    refused(c.post("/v1/pairs/nope/storage-mappings", json={"source": "/a", "target": "/b"}), 404, "no pair")
    mapping_id = pair["storage_mappings"][0]["id"]
    after = {h["hostname"]: h["desired_revision"] for h in ok(c.get("/v1/hosts"))}
    assert all(after[h] == before[h] + 2 for h in hosts), "every host of the pair hears of each mapping"
    assert c.delete(f"/v1/pairs/gold-silver/storage-mappings/{mapping_id}").status_code == 204
    refused(c.delete(f"/v1/pairs/gold-silver/storage-mappings/{mapping_id}"), 404)
    assert ok(c.get("/v1/pairs/gold-silver"))["storage_mappings"] == []

    ok(c.post("/v1/policies", json={"name": "p15", "frequency": 900}), 201)
    assert ok(c.put("/v1/pairs/gold-silver/policy", json={"policy": "p15"}))["policy"] == "p15"
    refused(c.put("/v1/pairs/gold-silver/policy", json={"policy": "ghost"}), 422, "no policy 'ghost'")
    assert ok(c.get("/v1/policies/p15"))["pairs"] == ["gold-silver"]
    refused(c.delete("/v1/policies/p15"), 409, "in use")


def test_hosts_join_clouds_of_their_site(controller):
    c = controller.client
    deployment(controller)
    add_host(controller.store, "stray", "b")
    refused(c.put("/v1/hosts/stray/cloud", json={"cloud": "gold"}), 422, "on site 'a'")
    refused(c.put("/v1/hosts/ghost/cloud", json={"cloud": "gold"}), 404, "no host 'ghost'")
    host = ok(c.put("/v1/hosts/stray/cloud", json={"cloud": "silver"}))
    assert host["cloud"] == "silver" and host["desired_revision"] == 2
    assert sorted(ok(c.get("/v1/clouds/silver"))["hosts"]) == ["rb1", "stray"]
    assert ok(c.put("/v1/hosts/stray/cloud", json={"cloud": None}))["cloud"] is None


def test_policy_validation_follows_replicatord(controller):
    c = controller.client
    good = ok(c.post("/v1/policies", json={
        "name": "full", "frequency": "30s", "additional_points": 24, "app_consistent_hours": 12,
        "compression": False, "auth": "kerberos", "port": 8083, "initial_method": "scheduled",
        "initial_at": "22:00:00", "delete_replica_on_remove": True, "bandwidth_limit": "100M",
        "resync": "auto", "resync_window": "22:00-06:00", "rpo_threshold": "15m", "copy_rate_when_busy": "20M"}),
        201)
    assert (good["frequency"], good["bandwidth_limit"], good["initial_at"]) == (30, 100 * 2 ** 20, "22:00:00")
    assert (good["rpo_threshold"], good["copy_rate_when_busy"]) == (900, 20 * 2 ** 20)
    azure = ok(c.post("/v1/policies", json={"name": "cloudy", "target_kind": "azure",
                                            "azure_storage_account": "drstore01", "azure_container": "replicas",
                                            "azure_encrypt": True, "initial_method": "offline",
                                            "initial_seed_dir": "/seed"}), 201)
    assert azure["azure_encrypt"] is True and azure["initial_seed_dir"] == "/seed"
    assert azure["copy_rate_when_busy"] == 50 * 2 ** 20                     # replicatord's default
    cases = [
        ({"frequency": "7m"}, "must be 30s, 5m or 15m"),
        ({"frequency": True}, "frequency"),
        ({"additional_points": 25}, "additional_points"),
        ({"app_consistent_hours": 2}, "needs additional_points >= 1"),
        ({"additional_points": 2, "app_consistent_hours": 2}, "must be less than additional_points"),
        ({"bandwidth_limit": "fast"}, "bytes per second"),
        ({"bandwidth_limit": "99999999T"}, "beyond any link"),
        ({"resync_window": "25:00-01:00"}, "HH:MM-HH:MM"),
        ({"resync": "manual", "resync_window": "22:00-06:00"}, "only applies to resync"),
        ({"initial_method": "scheduled"}, "initial_at: missing"),
        ({"initial_method": "network", "initial_path": "/x"}, "does not apply"),
        ({"initial_method": "scheduled", "initial_at": "tomorrow"}, "must be a date-time"),
        ({"initial_method": "existing", "initial_path": "relative"}, "initial_path"),
        ({"target_kind": "azure"}, "needs both"),
        ({"azure_encrypt": True}, "only for target_kind 'azure'"),
        ({"auth": "ntlm"}, "auth"),
        ({"port": 0}, "port"),
        ({"rpo_threshold": "5s"}, "from 30s to 24h"),
        ({"rpo_threshold": "2d"}, "from 30s to 24h"),
        ({"copy_rate_when_busy": "fast"}, "bytes per second"),
        ({"copy_rate_when_busy": -5}, "copy_rate_when_busy"),
        ({"copy_rate_when_busy": "512K"}, "at least 1M"),
    ]
    for extra, message in cases:
        refused(c.post("/v1/policies", json={"name": "bad", **extra}), 422, message)
    assert {p["name"] for p in ok(c.get("/v1/policies"))} == {"full", "cloudy"}
    changed = ok(c.put("/v1/policies/full", json={"name": "full", "frequency": "15m", "copy_rate_when_busy": "none"}))
    assert changed["frequency"] == 900 and changed["auth"] == "certificate", "PUT replaces every setting"
    assert changed["copy_rate_when_busy"] == 0                              # full speed
    refused(c.put("/v1/policies/full", json={"name": "other"}), 409, "not renamed")
    refused(c.put("/v1/policies/ghost", json={"name": "ghost"}), 404)
    assert c.delete("/v1/policies/cloudy").status_code == 204


def test_a_policy_change_reaches_the_hosts_of_its_machines(controller):
    c = controller.client
    deployment(controller)
    ok(c.post("/v1/machines", json={"name": "vm01", "cloud": "gold", "primary_host": "pa1", "domain": "vm01"}), 201)
    rev = {h["hostname"]: h["desired_revision"] for h in ok(c.get("/v1/hosts"))}
    ok(c.put("/v1/policies/p5", json={"name": "p5", "frequency": "30s"}))
    now = {h["hostname"]: h["desired_revision"] for h in ok(c.get("/v1/hosts"))}
    assert now == {"pa1": rev["pa1"] + 1, "pa2": rev["pa2"], "rb1": rev["rb1"] + 1}
