"""desired.py on the store (SQLite and PostgreSQL): what each host of a pair is given -- the primary's machines
with their policy aimed at the replica host, the replica's allow list by host id with the mapped storage
root -- accepted by replicatord's own settings loader; and a revision that moves exactly when a host's
rendering changes."""
from __future__ import annotations

from replicator.controller import desired
from replicator.controller import models as m
from replicator.orchestration.settings import parse_config_data


def _fleet(s):
    east, west = m.Site(name="east"), m.Site(name="west")
    s.add_all([east, west])
    s.flush()
    gold, dr = m.Cloud(name="gold", site=east), m.Cloud(name="gold-dr", site=west)
    hosts = {n: m.Host(id=f"id-{n}", hostname=n, site=site, cloud=cloud, admin_url="http://127.0.0.1:8085",
                       data_url=f"https://{n}.example:8084")
             for n, site, cloud in (("p1", east, gold), ("p2", east, gold), ("r1", west, dr))}
    policy = m.ProtectionPolicy(name="fast", frequency=30, additional_points=2, bandwidth_limit=1 << 20)
    pair = m.CloudPair(name="gold-pair")
    s.add_all([gold, dr, *hosts.values(), policy, pair])
    s.flush()
    gold.pair, gold.pair_role, dr.pair, dr.pair_role = pair, "primary", pair, "recovery"
    pair.association = m.PolicyAssociation(policy=policy)
    pair.storage_mappings.append(m.StorageMapping(source_root="/srv/vms", target_root="/replica/vms"))
    pair.storage_mappings.append(m.StorageMapping(source_root="/srv/db", target_root="/replica/db"))
    s.add(m.Machine(name="vm01", cloud=gold, primary_host=hosts["p1"], replica_host=hosts["r1"],
                    disks=["/srv/db/a.vhdx"], excluded=[], fencing_epoch=3))
    s.add(m.Machine(name="vm02", cloud=gold, primary_host=hosts["p1"], replica_host=hosts["r1"],
                    disks=["/srv/db/b.vhdx"], excluded=[], desired_state="paused", resync_requested=2))
    s.add(m.Machine(name="vm03", cloud=gold, primary_host=hosts["p2"], replica_host=hosts["r1"],
                    disks=["/srv/vms/c.vhdx"], excluded=[], desired_state="disabled"))
    s.flush()
    return hosts, policy, pair


def test_rendering_is_a_valid_configuration_for_each_host(store, tmp_path):
    with store.session() as s:
        hosts, policy, pair = _fleet(s)
        p1 = desired.current(s, hosts["p1"])
        cfg = p1["config"]
        assert cfg["daemon"] == {"state_dir": "..", "admin_listen": "127.0.0.1:8085"}
        assert [x["name"] for x in cfg["machine"]] == ["vm01", "vm02"] and "replica" not in cfg
        vm01 = cfg["machine"][0]
        assert vm01["target"] == "https://r1.example:8084" and vm01["frequency"] == 30
        assert (vm01["cert"], vm01["key"], vm01["ca"]) == ("host.pem", "host.key", "ca.pem")
        assert vm01["bandwidth_limit"] == 1 << 20 and vm01["additional_points"] == 2
        assert p1["fencing"] == {"vm01": {"epoch": 3, "role": "primary"}, "vm02": {"epoch": 1, "role": "primary"}}
        assert p1["operations"]["vm02"] == {"state": "paused", "resync": 2}
        config = parse_config_data(cfg, base_dir=str(tmp_path / "state" / "controller"))
        assert config.daemon.state_dir == str(tmp_path / "state")
        assert config.machines[0].protection.cert == str(tmp_path / "state" / "controller" / "host.pem")
        assert config.machines[0].protection.rpo_threshold == 3600          # the policy's RPO threshold
        policy.rpo_threshold = 120
        s.flush()
        again = parse_config_data(desired.render(s, hosts["p1"])["config"], base_dir=str(tmp_path))
        assert again.machines[0].protection.rpo_threshold == 120
        assert again.machines[0].protection.copy_rate_when_busy == 50 << 20   # the policy's copy pacing
        assert "copy_rate_when_busy" not in cfg["machine"][0]     # the default is left out (older hosts)
        for rate, seen in ((0, None), (20 << 20, 20 << 20)):      # 0: full speed
            policy.copy_rate_when_busy = rate
            s.flush()
            again = parse_config_data(desired.render(s, hosts["p1"])["config"], base_dir=str(tmp_path))
            assert again.machines[0].protection.copy_rate_when_busy == seen

        assert "machine" not in desired.current(s, hosts["p2"])["config"]          # vm03 is disabled
        r1 = desired.current(s, hosts["r1"])
        rep = r1["config"]["replica"]
        assert (rep["listen"], rep["port"]) == ("r1.example", 8084)
        # every primary host of the pair may replicate here, into the root its disks map to
        assert rep["allow"] == [{"principal": "id-p1", "storage": "/replica/db", "trust_group": "gold-pair"},
                                {"principal": "id-p2", "storage": "/replica/vms", "trust_group": "gold-pair"}]
        assert r1["fencing"] == {"vm01": {"epoch": 3, "role": "replica"}, "vm02": {"epoch": 1, "role": "replica"}}
        parse_config_data(r1["config"], base_dir=str(tmp_path))

        # a network mapping: the replica maps networks for the domains a failover starts through libvirt
        pair.network_mappings.append(m.NetworkMapping(source_network="prod", target_network="dr-prod"))
        s.flush()
        rep = desired.current(s, hosts["r1"])["config"]["replica"]
        assert rep["network_map"] == {"prod": "dr-prod"} and rep["libvirt"] == "qemu:///system"
        parse_config_data(desired.render(s, hosts["r1"])["config"], base_dir=str(tmp_path))

        # Kerberos: an http target on 8083 and no certificate files
        policy.auth = "kerberos"
        s.flush()
        vm01 = desired.render(s, hosts["p1"])["config"]["machine"][0]
        assert vm01["target"] == "http://r1.example:8083" and "cert" not in vm01
        parse_config_data(desired.render(s, hosts["p1"])["config"], base_dir=str(tmp_path))


def test_the_revision_moves_when_and_only_when_the_rendering_changes(store):
    with store.session() as s:
        hosts, policy, _ = _fleet(s)
        first = desired.current(s, hosts["p1"])["revision"]
        assert desired.current(s, hosts["p1"])["revision"] == first                # nothing changed
        r1 = desired.current(s, hosts["r1"])["revision"]
        policy.frequency = 300
        s.flush()
        assert desired.current(s, hosts["p1"])["revision"] == first + 1
        assert desired.current(s, hosts["p1"])["revision"] == first + 1
        assert desired.current(s, hosts["r1"])["revision"] == r1                   # its rendering is the same
        # a route raised it (api/common.py bump_revision) and the rendering changed: one new revision
        hosts["p1"].desired_revision += 1
        policy.frequency = 900
        s.flush()
        assert desired.current(s, hosts["p1"])["revision"] == first + 2
        # a route raised it but nothing changed: the new number is served once, then stays
        hosts["p1"].desired_revision += 1
        s.flush()
        assert desired.current(s, hosts["p1"])["revision"] == first + 3
        policy.frequency = 30                                                        # changed under it: raised
        s.flush()
        assert desired.current(s, hosts["p1"])["revision"] == first + 4
        entries = s.query(m.AuditEntry).filter_by(action="host.desired", target="id-p1").all()
        assert [e.detail["revision"] for e in entries] == [first, first + 1, first + 2, first + 3, first + 4]
