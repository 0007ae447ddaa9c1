"""[[extended]] in replicatord.toml: defaults from [replica], and every problem named by its field."""
from __future__ import annotations

import pytest

from replicator.orchestration.settings import ConfigError, parse_config

REPLICA = '''
[daemon]
state_dir = "/tmp/state"
[replica]
cert = "/pki/b.pem"
key = "/pki/b.key"
ca = "/pki/ca.pem"
allow = [{principal = "site-a", storage = "/srv/r"}]
'''


def test_a_leg_takes_the_replica_certificate_and_storage_by_default():
    cfg = parse_config(REPLICA + '''
[[extended]]
machine = "vm01"
target = "https://c:8084"
frequency = "15m"
additional_points = 3
bandwidth_limit = "10M"
initial_replication = { mode = "offline", seed_dir = "/media/usb" }
''')
    [leg] = cfg.extended
    assert (leg.machine, leg.frequency, leg.additional_points, leg.bandwidth_limit) == ("vm01", 900.0, 3, 10 << 20)
    assert (leg.cert, leg.key, leg.ca, leg.storage, leg.seed_dir) == ("/pki/b.pem", "/pki/b.key", "/pki/ca.pem",
                                                                      "/srv/r", "/media/usb")


@pytest.mark.parametrize("body, field, words", [
    ('machine = "vm01"\ntarget = "https://c"\nfrequency = "30s"', "extended[vm01].frequency", "5m or 15m"),
    ('machine = "vm01"', "extended[vm01].target", "missing"),
    ('machine = "vm01"\ntarget = "https://c"\nstorage = "/elsewhere"', "extended[vm01].storage", "not a storage"),
    ('machine = "vm01"\ntarget = "https://c"\nadditional_points = 25', "extended[vm01].additional_points", "24"),
    ('machine = "vm01"\ntarget = "https://c"\nsurprise = 1', "extended[vm01].surprise", "unknown key"),
    ('machine = "vm01"\ntarget = "https://c"\ninitial_replication = "carrier pigeon"',
     "extended[vm01].initial_replication", "offline"),
])
def test_problems_are_named_by_field(body, field, words):
    with pytest.raises(ConfigError) as e:
        parse_config(REPLICA + "[[extended]]\n" + body + "\n")
    assert any(p == field and words in r for p, r in e.value.problems), e.value.problems


def test_a_leg_needs_a_replica_role():
    with pytest.raises(ConfigError) as e:
        parse_config('[daemon]\nstate_dir = "/tmp/s"\n[[machine]]\nname = "a"\ndisks = ["/d.vhdx"]\n'
                     'target = "local:///r"\n[[extended]]\nmachine = "a"\ntarget = "https://c"\n')
    assert any("no [replica]" in r for _, r in e.value.problems)
