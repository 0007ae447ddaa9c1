"""Hostile [[extended]] tables: each problem is named by its field when the configuration is read
(`replicatord --check-config` said valid, then the daemon failed at start or forwarded into itself)."""
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
allow = [{principal = "site-a", storage = "/srv/r"}, {principal = "site-x", storage = "/srv/x"}]
'''


@pytest.mark.parametrize("body, words", [
    ('target = "ftp://c"', "must be https://"),
    ('target = "https://c/some/path"', "HOST[:PORT]"),
    ('target = "local://relative"', "ABSOLUTE"),
    ('target = "local:///srv/r"', "its own storage"),           # the leg would forward the store into itself
    ('target = "local:///srv/r/"', "its own storage"),
    ('target = "local:///srv/x"', "its own storage"),           # another root this replica server writes
])
def test_a_target_is_checked_with_the_configuration(body, words):
    with pytest.raises(ConfigError) as e:
        parse_config(REPLICA + '[[extended]]\nmachine = "vm01"\nstorage = "/srv/r"\n' + body + "\n")
    assert any(p == "extended[vm01].target" and words in r for p, r in e.value.problems), e.value.problems


def test_a_good_target_still_passes():
    cfg = parse_config(REPLICA + '[[extended]]\nmachine = "vm01"\nstorage = "/srv/r"\ntarget = "local:///srv/c"\n')
    assert cfg.extended[0].target == "local:///srv/c"
