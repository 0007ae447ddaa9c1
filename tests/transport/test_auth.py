"""Authorization entries: one-wildcard matching, the most specific entry wins, storage mapping puts each
primary's disks in its entry's root, and trust groups keep strangers off each other's disks."""
from __future__ import annotations

import os
import uuid

import pytest

from replicator.errors import UsageError
from replicator.transport import AuthorizationEntry, AuthorizationError, ReplicaClient, authorize

from .conftest import SIZE, run


@pytest.mark.parametrize("pattern,principal,ok", [
    ("*.contoso.com", "hv1.contoso.com", True),
    ("*.contoso.com", "a.b.contoso.com", True),
    ("*.contoso.com", "contoso.com", False),
    ("*.contoso.com", "hv1.contoso.com.evil", False),
    ("hv*.contoso.com", "hv12.contoso.com", True),
    ("hv*.contoso.com", "web1.contoso.com", False),
    ("primary1@*", "primary1@EXAMPLE.ORG", True),
    ("primary1@*", "primary10@EXAMPLE.ORG", False),
    ("*", "anyone", True),
    ("exact.host", "exact.host", True),
    ("exact.host", "exact.hostx", False),
    ("ab*ba", "aba", False),                       # prefix and suffix may not overlap
])
def test_wildcard_matching(pattern, principal, ok):
    assert AuthorizationEntry(pattern, "/r").matches(principal) is ok


def test_more_than_one_wildcard_is_refused():
    with pytest.raises(UsageError, match="more than one"):
        AuthorizationEntry("*.*.example", "/r")


def test_case_is_ignored_for_certificate_names_only():
    e = AuthorizationEntry("*.Contoso.com", "/r")
    assert e.matches("HV1.contoso.COM", ignore_case=True)
    assert not e.matches("HV1.contoso.COM")


def test_most_specific_entry_wins():
    entries = [AuthorizationEntry("*", "/any"), AuthorizationEntry("*.site-a.example", "/a"),
               AuthorizationEntry("primary1.site-a.example", "/p1"), AuthorizationEntry("*.example", "/ex")]
    assert authorize(entries, "primary1.site-a.example").storage_root == "/p1"
    assert authorize(entries, "host9.site-a.example").storage_root == "/a"
    assert authorize(entries, "b.example").storage_root == "/ex"
    assert authorize(entries, "elsewhere").storage_root == "/any"
    with pytest.raises(AuthorizationError):
        authorize(entries[1:], "elsewhere")


def _ensure(server, pki, name, disk_id):
    async def go():
        async with ReplicaClient(server.url, **pki.pair(name), retries=0) as c:
            return await c.ensure_disk(disk_id, SIZE)
    return run(go())


def test_unauthorized_primary_is_refused_and_counted(servers, pki, tmp_path):
    server = servers.cert([AuthorizationEntry("primary*", str(tmp_path / "root"))])
    with pytest.raises(AuthorizationError, match="'intruder' is not authorized"):
        _ensure(server, pki, "intruder", uuid.uuid4())
    assert server.counters["unauthorized"] == 1 and server.counters["refused:forbidden"] == 1
    assert not (tmp_path / "root").exists()           # nothing was created for it


def test_storage_mapping_puts_disks_in_the_entry_root(servers, pki, tmp_path):
    a, p1 = tmp_path / "site-a", tmp_path / "primary1"
    server = servers.cert([AuthorizationEntry("*.site-a.example", str(a)),
                           AuthorizationEntry("primary1.site-a.example", str(p1))])
    d1, d2 = uuid.uuid4(), uuid.uuid4()
    _ensure(server, pki, "primary1.site-a.example", d1)
    _ensure(server, pki, "host9.site-a.example", d2)
    assert os.listdir(p1 / "disks") == [str(d1)]
    assert os.listdir(a / "disks") == [str(d2)]
    with pytest.raises(AuthorizationError):
        _ensure(server, pki, "primary1", uuid.uuid4())          # matches neither entry


def test_trust_groups_keep_other_primaries_off_a_disk(servers, pki, tmp_path):
    root = str(tmp_path / "root")
    server = servers.cert([AuthorizationEntry("primary1", root, "cluster-a"),
                           AuthorizationEntry("primary2", root, "cluster-a"),
                           AuthorizationEntry("intruder", root, "cluster-b")])
    disk = uuid.uuid4()
    _ensure(server, pki, "primary1", disk)
    assert _ensure(server, pki, "primary2", disk)["disk_id"] == str(disk)     # same group: the VM moved
    with pytest.raises(AuthorizationError, match="belongs to trust group 'cluster-a'"):
        _ensure(server, pki, "intruder", disk)
    assert server.counters["unauthorized"] == 1
