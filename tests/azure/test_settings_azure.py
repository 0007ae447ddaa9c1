"""The Azure protection settings in replicatord.toml: `encryption_key_file` (the customer's key) and
`[machine.azure_vm]` (the VM a failover deploys), each refused field by field in one line per problem,
and `replicatord --check-config` saying so before anything starts."""
from __future__ import annotations

import os
import subprocess

import pytest

from replicator.azure.crypto import new_key_line
from replicator.orchestration.settings import ConfigError, parse_config

from ..daemon.test_replicatord import BIN

URL = "azure://devstoreaccount1/replicas?endpoint=http://127.0.0.1:1/devstoreaccount1"
VM = '''
[machine.azure_vm]
size = "Standard_D2s_v3"
os_disk = "d0.vhdx"
nics = [{ network = "lan", subnet = "app", ip = "10.1.0.10" }, { network = "lan" }]
network_map = { lan = "prod" }
test_vnet = "iso"
vnets.prod = { id = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Network/virtualNetworks/prod", subnets = { app = "10.1.0.0/24" } }
vnets.iso = { id = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Network/virtualNetworks/iso", subnets = { app = "10.9.0.0/24" } }
'''


def machine(extra: str = "", target: str = URL, vm: str = VM) -> str:
    return f'''[[machine]]
name = "vm01"
disks = ["d0.vhdx", "d1.vhdx"]
target = "{target}"
{extra}
{vm}'''


def problems(text: str, base) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as e:
        parse_config(text, base_dir=str(base))
    return e.value.problems


def test_key_file_and_vm_are_machine_settings(tmp_path):
    (tmp_path / "azure.key").write_text(new_key_line() + "\n")
    cfg = parse_config(machine('encryption_key_file = "azure.key"'), base_dir=str(tmp_path))
    m = cfg.machine("vm01")
    assert m.protection.encryption_key_file == str(tmp_path / "azure.key")
    assert m.azure_vm.name == "vm01" and m.azure_vm.size == "Standard_D2s_v3" and m.azure_vm.os_disk == "d0.vhdx"
    assert [(n.network, n.subnet, n.ip) for n in m.azure_vm.nics] == [("lan", "app", "10.1.0.10"), ("lan", "", "")]
    assert m.azure_vm.vnets["prod"].subnets == {"app": "10.1.0.0/24"} and m.azure_vm.test_vnet == "iso"
    # in a group, inherited; a missing file is a warning (it may be put there before the daemon starts)
    cfg = parse_config('[[group]]\nname = "az"\nencryption_key_file = "later.key"\n' + machine('group = "az"'),
                       base_dir=str(tmp_path))
    assert cfg.machine("vm01").protection.encryption_key_file == str(tmp_path / "later.key")
    assert any("later.key does not exist" in w for w in cfg.warnings)


def test_bad_azure_settings_are_one_line_each(tmp_path):
    (tmp_path / "bad.key").write_text("not hex\n")
    (tmp_path / "good.key").write_text(new_key_line() + "\n")
    found = dict(problems(machine('encryption_key_file = "bad.key"'), tmp_path))
    assert "key 1 is not 64 hex digits" in found["machine[vm01].encryption_key_file"]
    found = dict(problems(machine('encryption_key_file = "good.key"', target="https://replica:8084",
                                  vm="") + '\ncert = "c"\nkey = "k"\nca = "a"\n', tmp_path))
    assert "only applies to an azure:// target" in found["machine[vm01].encryption_key_file"]
    found = dict(problems(machine('encryption_key_file = "good.key"', target=URL + "&key_file=/k"), tmp_path))
    assert "keep one of them" in found["machine[vm01].encryption_key_file"]

    bad_vm = '''
[machine.azure_vm]
size = 3
os_disk = "d9.vhdx"
os_type = "BeOS"
max_nics = 0
disk_sku = "Gold"
colour = "blue"
nics = [{ network = "lan", ip = "10.1.0.300" }, "eth1"]
network_map = { lan = "nowhere" }
test_vnet = "iso"
vnets.prod = { id = "prod", subnets = { app = "10.1.0.0/24" } }
'''
    found = dict(problems(machine(vm=bad_vm), tmp_path))
    at = "machine[vm01].azure_vm."
    assert found[at + "size"] == "must be a non-empty string"
    assert "'d9.vhdx' is not one of the machine's disks (d0.vhdx, d1.vhdx)" in found[at + "os_disk"]
    assert "Linux" in found[at + "os_type"] and "between 1 and 8" in found[at + "max_nics"]
    assert "Standard_LRS" in found[at + "disk_sku"] and "unknown key" in found[at + "colour"]
    assert "not an IP address" in found[at + "nics[0].ip"] and "network required" in found[at + "nics[1]"]
    assert "resource id" in found[at + "vnets.prod.id"]
    assert "'nowhere' is not described" in found[at + "network_map.lan"]
    assert "'iso' is not described" in found[at + "test_vnet"]
    assert all("\n" not in reason for reason in found.values())
    # deploy-time rules are checked when the configuration is read: an IP Azure reserves in the subnet
    found = dict(problems(machine(vm=VM.replace("10.1.0.10", "10.1.0.1")), tmp_path))
    assert "one of the addresses Azure reserves" in found[at + "nics"]
    found = dict(problems(machine(vm=VM, target="local:///srv/replica"), tmp_path))
    assert found["machine[vm01].azure_vm"] == "only applies to an azure:// target"


def test_check_config_names_the_azure_problems(tmp_path):
    (tmp_path / "bad.key").write_text("0011\n")
    conf = tmp_path / "replicatord.toml"
    conf.write_text('[daemon]\nstate_dir = "state"\n\n' + machine('encryption_key_file = "bad.key"',
                                                                    vm=VM.replace('"d0.vhdx"', '"d7.vhdx"')))
    r = subprocess.run([os.path.join(BIN, "replicatord"), "--config", str(conf), "--check-config"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert "machine[vm01].encryption_key_file:" in r.stderr and "machine[vm01].azure_vm.os_disk:" in r.stderr
    assert not os.path.exists(tmp_path / "state")
