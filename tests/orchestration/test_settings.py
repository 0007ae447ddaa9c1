"""replicatord.toml: the example loads; every kind of bad input is refused with its field path and reason,
all problems in one error."""
from __future__ import annotations

import datetime as dt
import os

import pytest

from replicator.errors import UsageError
from replicator.orchestration.settings import ConfigError, load_config, parse_config
from replicator.replica.limits import ReplicaLimits

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "replicatord.example.toml")


@pytest.fixture
def disks(tmp_path):
    for name in ("a.vhdx", "b.vhdx", "c.vhdx"):
        (tmp_path / name).write_bytes(b"")
    return tmp_path


def conf(tmp_path, machine: str = "", extra: str = "", group: str = "") -> str:
    return f"""
[daemon]
state_dir = "state"
{extra}
[[group]]
name = "g"
target = "local:///srv/replicas"
{group}
[[machine]]
name = "vm1"
group = "g"
disks = ["a.vhdx", "b.vhdx"]
{machine}
"""


def load(tmp_path, text: str, **kw):
    return parse_config(text, base_dir=str(tmp_path), **kw)


def problems(tmp_path, text: str) -> dict[str, str]:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, text)
    assert isinstance(e.value, UsageError) and e.value.exit_code == 2
    for path, reason in e.value.problems:
        assert f"{path}: {reason}" in e.value.message
    return dict(e.value.problems)


def test_example_config_loads_with_only_file_warnings():
    c = load_config(EXAMPLE)
    assert c.roles == ("primary", "replica")
    assert [m.name for m in c.machines] == ["web1", "web2", "archive"]
    web1, web2, archive = c.machines
    assert web1.excluded and web1.excluded[0] not in web1.disks and len(web1.disks) == 2
    assert web2.protection.frequency == 30 and web1.protection.frequency == 300    # override vs group
    assert web1.protection.bandwidth_limit == 100 << 20
    assert web1.protection.replica_port == 8084 and web1.protection.quiesce.provider == "qga"
    assert c.groups["bulk"].initial_replication.at == dt.time(23, 30)
    assert archive.protection.initial_replication.mode == "existing" and archive.protection.resync == "manual"
    assert c.replica.port == 8084 and len(c.replica.allow) == 2 and c.replica.limits.max_disks == 1024
    assert c.daemon.admin_host == "127.0.0.1" and c.daemon.admin_port == 8085
    assert c.warnings and all("does not exist" in w for w in c.warnings)


def test_minimal_config_relative_paths_and_defaults(tmp_path, disks):
    c = load(tmp_path, conf(tmp_path))
    m = c.machine("vm1")
    assert m.disks == (str(tmp_path / "a.vhdx"), str(tmp_path / "b.vhdx"))
    assert c.daemon.state_dir == str(tmp_path / "state")
    assert c.daemon.admin_token_file == str(tmp_path / "state" / "admin.token")
    p = m.protection
    assert (p.frequency, p.additional_points, p.app_consistent_hours, p.compression) == (300, 0, 0, True)
    assert p.initial_replication.mode == "network" and p.bandwidth_limit is None and p.replica_port is None
    assert c.roles == ("primary",) and c.warnings == []


@pytest.mark.parametrize("value,seconds", [('"30s"', 30), ('"5m"', 300), ('"15m"', 900), ("30", 30),
                                           ("300", 300), ("900", 900), ('"300s"', 300), ('"15min"', 900)])
def test_frequency_forms(tmp_path, disks, value, seconds):
    assert load(tmp_path, conf(tmp_path, f"frequency = {value}")).machines[0].protection.frequency == seconds


@pytest.mark.parametrize("value", ['"10m"', "60", '"1h"', "true", "0", '"fast"'])
def test_frequency_refused(tmp_path, disks, value):
    p = problems(tmp_path, conf(tmp_path, f"frequency = {value}"))
    assert "30s, 5m or 15m" in p["machine[vm1].frequency"]


@pytest.mark.parametrize("value,rate", [('"100M"', 100 << 20), ('"512K"', 512 << 10), ('"1G"', 1 << 30),
                                        ("1000", 1000), ('"0"', None), ("0", None), ('"none"', None),
                                        ('"1.5MiB/s"', 3 << 19)])
def test_bandwidth_forms(tmp_path, disks, value, rate):
    assert load(tmp_path, conf(tmp_path, f"bandwidth_limit = {value}")).machines[0].protection.bandwidth_limit == rate


@pytest.mark.parametrize("value,seconds", [(None, 3600), ('"15m"', 900), ('"90s"', 90), ("45", 45), ('"24h"', 86400)])
def test_rpo_threshold_forms(tmp_path, disks, value, seconds):
    extra = "" if value is None else f"rpo_threshold = {value}"
    assert load(tmp_path, conf(tmp_path, extra)).machines[0].protection.rpo_threshold == seconds


@pytest.mark.parametrize("value,rate", [(None, 50 << 20), ('"20M"', 20 << 20), ('"none"', None), ("0", None),
                                        ('"1M"', 1 << 20)])
def test_copy_rate_when_busy_forms(tmp_path, disks, value, rate):
    extra = "" if value is None else f"copy_rate_when_busy = {value}"
    assert load(tmp_path, conf(tmp_path, extra)).machines[0].protection.copy_rate_when_busy == rate


@pytest.mark.parametrize("value,why", [('"512K"', "at least 1M"), ("1000", "at least 1M"), ('"fast"', "bytes per second"),
                                       ("-1", "negative")])
def test_copy_rate_when_busy_refused(tmp_path, disks, value, why):
    """A rate that low would sleep a whole chunk for seconds at a time: a stop would wait for it."""
    assert why in problems(tmp_path, conf(tmp_path, f"copy_rate_when_busy = {value}"))["machine[vm1].copy_rate_when_busy"]


@pytest.mark.parametrize("value", ['"10s"', "29", '"25h"', "true", '"soon"', "-60"])
def test_rpo_threshold_refused(tmp_path, disks, value):
    p = problems(tmp_path, conf(tmp_path, f"rpo_threshold = {value}"))
    assert "from 30s to 24h" in p["machine[vm1].rpo_threshold"]


@pytest.mark.parametrize("value", ['"fast"', "-5", '"-5M"', '"10X"', "true", '"' + "9" * 400 + 'M"'])
def test_bandwidth_refused(tmp_path, disks, value):
    """The long digit string was an OverflowError out of the configuration's loading (a float's infinity)."""
    assert "machine[vm1].bandwidth_limit" in problems(tmp_path, conf(tmp_path, f"bandwidth_limit = {value}"))


@pytest.mark.parametrize("key,value,reason", [
    ("additional_points", "25", "between 0 and 24"), ("additional_points", "-1", "between 0 and 24"),
    ("app_consistent_hours", "13", "between 1 and 12"), ("app_consistent_hours", "0", "between 1 and 12"),
    ("port", "0", "between 1 and 65535"), ("port", "65536", "between 1 and 65535"),
    ("additional_points", '"4"', "must be an integer"), ("compression", '"yes"', "true or false"),
    ("auth", '"ntlm"', "'certificate' or 'kerberos'"), ("resync", '"sometimes"', "'auto' or 'manual'"),
    ("resync_window", '"25:00-06:00"', "HH:MM-HH:MM"), ("resync_window", '"06:00-06:00"', "empty"),
    ("target", '"ftp://x"', "https://HOST:8084"), ("target", '"local://relative/path"', "local:///"),
    ("target", '"https://host:99999"', "bad port"), ("target", '"azure://account"', "azure://ACCOUNT/CONTAINER"),
])
def test_out_of_range_and_malformed_values(tmp_path, disks, key, value, reason):
    p = problems(tmp_path, conf(tmp_path, f"{key} = {value}"))
    assert reason in p[f"machine[vm1].{key}"]


def test_boundaries_accepted(tmp_path, disks):
    c = load(tmp_path, conf(tmp_path, "additional_points = 24\napp_consistent_hours = 12\nport = 65535\n"
                            'quiesce = { provider = "script", pre_freeze = "true" }'))
    p = c.machines[0].protection
    assert (p.additional_points, p.app_consistent_hours, p.port) == (24, 12, 65535)


def test_app_consistent_rules(tmp_path, disks):
    q = 'quiesce = { provider = "script", pre_freeze = "true" }'
    p = problems(tmp_path, conf(tmp_path, f"app_consistent_hours = 2\n{q}"))
    assert "needs additional_points >= 1" in p["machine[vm1].app_consistent_hours"]
    p = problems(tmp_path, conf(tmp_path, f"app_consistent_hours = 4\nadditional_points = 4\n{q}"))
    assert "less than additional_points (4)" in p["machine[vm1].app_consistent_hours"]
    p = problems(tmp_path, conf(tmp_path, "app_consistent_hours = 1\nadditional_points = 4"))
    assert "need a quiesce provider" in p["machine[vm1].quiesce"]
    assert load(tmp_path, conf(tmp_path, f"app_consistent_hours = 3\nadditional_points = 4\n{q}"))


def test_unknown_keys_name_their_dotted_path(tmp_path, disks):
    text = conf(tmp_path, 'frequncy = "5m"\nquiesce = { provider = "qga", socket = "/s", color = 1 }\n'
                'initial_replication = { mode = "network", speed = 1 }',
                extra='bogus = 1\n[replica]\nallow = [{ principal = "*", storage = "/r", x = 1 }]\n'
                'cert = "c"\nkey = "k"\nca = "a"\nfoo = 2\n', group="colour = 'red'") + "\n[extra]\nx = 1\n"
    p = problems(tmp_path, text)
    for path in ("machine[vm1].frequncy", "machine[vm1].quiesce.color", "machine[vm1].initial_replication.speed",
                 "daemon.bogus", "replica.allow[0].x", "replica.foo", "group[g].colour", "extra"):
        assert "unknown key" in p[path], path


def test_initial_replication_modes(tmp_path, disks):
    def init(v):
        return load(tmp_path, conf(tmp_path, f"initial_replication = {v}")).machines[0].protection.initial_replication
    assert init('"network"').mode == "network"
    assert init('{ mode = "scheduled", at = 2099-01-02T03:04:05 }').at == dt.datetime(2099, 1, 2, 3, 4, 5)
    assert init('{ mode = "scheduled", at = "22:30" }').at == dt.time(22, 30)
    assert init('{ mode = "offline", seed_dir = "seed" }').seed_dir == str(tmp_path / "seed")
    assert init('{ mode = "existing", path = "/srv/old.vhdx" }').path == "/srv/old.vhdx"
    past = load(tmp_path, conf(tmp_path, 'initial_replication = { mode = "scheduled", at = 2001-01-01T00:00:00 }'))
    assert past.warnings == ["machine[vm1].initial_replication.at: is in the past: initial replication starts at once"]
    p = problems(tmp_path, conf(tmp_path, 'initial_replication = { mode = "scheduled" }'))
    assert "missing: mode 'scheduled' needs it" in p["machine[vm1].initial_replication.at"]
    p = problems(tmp_path, conf(tmp_path, 'initial_replication = { mode = "network", seed_dir = "/x" }'))
    assert "only applies to mode 'offline'" in p["machine[vm1].initial_replication.seed_dir"]
    p = problems(tmp_path, conf(tmp_path, 'initial_replication = "carrier-pigeon"'))
    assert "must be one of network, scheduled, offline, existing" in p["machine[vm1].initial_replication.mode"]
    p = problems(tmp_path, conf(tmp_path, 'initial_replication = { mode = "scheduled", at = "soon" }'))
    assert "date-time" in p["machine[vm1].initial_replication.at"]


def test_disks_duplicates_missing_and_exclusions(tmp_path, disks):
    two = conf(tmp_path) + '[[machine]]\nname = "vm2"\ntarget = "local:///r"\ndisks = ["b.vhdx", "missing.vhdx"]\n'
    p = problems(tmp_path, two)
    assert "also a disk of machine 'vm1'" in p["machine[vm2].disks[0]"]
    assert "machine[vm2].disks[1]" not in p                         # a missing file is only a warning
    c = load(tmp_path, conf(tmp_path).replace('"b.vhdx"]', '"b.vhdx", "gone.vhdx"]'))
    assert c.warnings == [f"machine[vm1].disks[2]: {tmp_path / 'gone.vhdx'} does not exist (yet): the machine "
                          "cannot replicate until it does"]
    with pytest.raises(ConfigError, match="gone.vhdx does not exist"):
        load(tmp_path, conf(tmp_path).replace('"b.vhdx"]', '"b.vhdx", "gone.vhdx"]'), strict=True)
    p = problems(tmp_path, conf(tmp_path, 'exclude = ["c.vhdx"]'))
    assert "is not one of the machine's disks" in p["machine[vm1].exclude[0]"]
    p = problems(tmp_path, conf(tmp_path, 'exclude = ["a.vhdx", "b.vhdx"]'))
    assert "nothing left to protect" in p["machine[vm1].exclude"]
    p = problems(tmp_path, conf(tmp_path).replace('"b.vhdx"]', '"b.vhdx", "a.vhdx"]'))
    assert "listed twice" in p["machine[vm1].disks[2]"]
    (tmp_path / "dir.vhdx").mkdir()
    p = problems(tmp_path, conf(tmp_path).replace('"b.vhdx"]', '"dir.vhdx"]'))
    assert "is not a file" in p["machine[vm1].disks[1]"]


def test_duplicate_names_and_unknown_group(tmp_path, disks):
    text = conf(tmp_path) + '[[machine]]\nname = "vm1"\ngroup = "nope"\ndisks = ["c.vhdx"]\n' \
        '[[group]]\nname = "g"\n[[machine]]\nname = "bad name!"\ntarget = "local:///r"\ndisks = ["c.vhdx"]\n'
    p = problems(tmp_path, text)
    assert "defined twice" in p["machine[vm1].name"]
    assert "no group named 'nope'" in p["machine[vm1].group"]
    assert "defined twice" in p["group[g].name"]
    assert "not a name" in p["machine[bad name!].name"]


def test_contradictions(tmp_path, disks):
    p = problems(tmp_path, conf(tmp_path, 'auth = "kerberos"\ntarget = "http://r:8083"\ncert = "c.pem"'))
    assert "uses no certificate files" in p["machine[vm1].auth"]
    p = problems(tmp_path, conf(tmp_path, 'auth = "kerberos"\ntarget = "https://r:8084"'))
    assert "needs http://" in p["machine[vm1].target"]
    p = problems(tmp_path, conf(tmp_path, 'target = "https://r:8084"\nport = 9000\ncert = "c"\nkey = "k"\nca = "a"'))
    assert "contradicts the target URL's port 8084" in p["machine[vm1].port"]
    p = problems(tmp_path, conf(tmp_path, 'target = "https://r"'))
    assert "needs cert, key and ca" in p["machine[vm1].cert"]
    p = problems(tmp_path, conf(tmp_path, 'resync = "manual"\nresync_window = "22:00-06:00"'))
    assert "only applies to resync" in p["machine[vm1].resync_window"]
    p = problems(tmp_path, conf(tmp_path, 'quiesce = { provider = "qga", pre_freeze = "x" }'))
    assert "does not apply" in p["machine[vm1].quiesce.pre_freeze"]
    assert "socket" in p["machine[vm1].quiesce.socket"]


def test_group_problem_reported_once_at_the_group(tmp_path, disks):
    p = problems(tmp_path, conf(tmp_path, group="app_consistent_hours = 3\nadditional_points = 2\n"
                                'quiesce = { provider = "script", post_thaw = "true" }'))
    assert "less than additional_points (2)" in p["group[g].app_consistent_hours"]
    assert "machine[vm1].app_consistent_hours" not in p


def test_kerberos_ports_and_replica_role(tmp_path, disks):
    c = load(tmp_path, conf(tmp_path, 'auth = "kerberos"\ntarget = "http://replica"'))
    assert c.machines[0].protection.replica_port == 8083
    rep = '[replica]\nauth = "kerberos"\n[[replica.allow]]\nprincipal = "host/*@EXAMPLE.COM"\nstorage = "r"\n'
    c = parse_config(rep, base_dir=str(tmp_path))
    assert c.roles == ("replica",) and c.replica.port == 8083 and c.replica.allow[0].storage == str(tmp_path / "r")
    p = problems(tmp_path, '[replica]\nauth = "kerberos"\ncert = "c"\n')
    assert "uses no certificate files" in p["replica.auth"] and "without [[replica.allow]]" in p["replica.allow"]
    p = problems(tmp_path, '[replica]\n[[replica.allow]]\nprincipal = "a*b*"\nstorage = "/r"\n'
                 '[[replica.allow]]\nstorage = "/r"\n')
    assert "more than one '*'" in p["replica.allow[0].principal"] and p["replica.allow[1].principal"] == "missing"
    for k in ("cert", "key", "ca"):
        assert "certificate authentication needs" in p[f"replica.{k}"]


def test_replica_server_limits(tmp_path, disks):
    rep = '[replica]\nauth = "kerberos"\n{}\n[[replica.allow]]\nprincipal = "p@R"\nstorage = "r"\n'
    c = parse_config(rep.format(""), base_dir=str(tmp_path))
    assert c.replica.limits == ReplicaLimits() and c.replica.limits.max_disk_size == 64 << 40
    assert (c.replica.limits.max_disks, c.replica.limits.max_uploads, c.replica.limits.digest_requests) == (1024, 8, 2)
    assert (c.replica.limits.header_timeout, c.replica.limits.read_timeout) == (30.0, 60.0)
    c = parse_config(rep.format('max_disk_size = "1.5T"\nmax_disks = 10\nmax_uploads = 1\nheader_timeout = "2m"\n'
                                'read_timeout = 0.5\ndigest_requests = 64'), base_dir=str(tmp_path))
    assert c.replica.limits == ReplicaLimits(3 << 39, 10, 1, 120.0, 0.5, 64)
    assert parse_config(rep.format("max_disk_size = 1048576"), base_dir=str(tmp_path)).replica.limits.max_disk_size \
        == 1 << 20
    p = problems(tmp_path, rep.format('max_disk_size = "65T"\nmax_disks = -1\nmax_uploads = "eight"\n'
                                      'header_timeout = 0\nread_timeout = true\ndigest_requests = 65\nmax_disk = 1'))
    assert "from 1M to 64T" in p["replica.max_disk_size"] and "from 1 to 1048576" in p["replica.max_disks"]
    assert "whole number from 1 to 1024, not 'eight'" in p["replica.max_uploads"]
    assert "seconds from 0.1 to 3600" in p["replica.header_timeout"] and "True" in p["replica.read_timeout"]
    assert "from 1 to 64" in p["replica.digest_requests"] and "unknown key" in p["replica.max_disk"]
    assert "max_disk_size" in p["replica.max_disk"]     # the known keys are listed


def test_admin_api_is_loopback_only(tmp_path, disks):
    p = problems(tmp_path, conf(tmp_path, extra='admin_listen = "0.0.0.0:8085"'))
    assert "loopback only" in p["daemon.admin_listen"]
    p = problems(tmp_path, conf(tmp_path, extra='admin_listen = "localhost"'))
    assert "HOST:PORT" in p["daemon.admin_listen"]
    c = load(tmp_path, conf(tmp_path, extra='admin_listen = "[::1]:9000"'))
    assert (c.daemon.admin_host, c.daemon.admin_port) == ("::1", 9000)


def test_every_problem_reported_at_once(tmp_path, disks):
    text = conf(tmp_path, 'frequency = "1h"\nadditional_points = 99\nport = 0\nexclude = ["zzz.vhdx"]\nwat = 1')
    with pytest.raises(ConfigError) as e:
        load(tmp_path, text)
    paths = [p for p, _ in e.value.problems]
    assert {"machine[vm1].frequency", "machine[vm1].additional_points", "machine[vm1].port",
            "machine[vm1].exclude[0]", "machine[vm1].wat"} <= set(paths)
    assert e.value.message.startswith("replicatord.toml: 5 problems:")


def test_syntax_error_empty_config_and_unreadable_file(tmp_path):
    p = problems(tmp_path, "[daemon\n")
    assert "(syntax)" in p
    p = problems(tmp_path, "[daemon]\n")
    assert "nothing to run" in p["(top)"]
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "absent.toml"))
    p = problems(tmp_path, 'machine = "x"\n')
    assert "must be an array of tables" in p["machine"]


REPLICA = '''
[replica]
cert = "r.pem"
key = "r.key"
ca = "ca.pem"
allow = [{ principal = "hv*", storage = "replicas" }]
'''


def test_replica_site_directories_reverse_settings_and_plans(tmp_path, disks):
    text = conf(tmp_path, machine='''
[[plan]]
name = "site"
[[plan.group]]
members = ["vm1"]
post = [{ script = "hooks/check db", timeout = 60 }, { manual = "Is the database up?", kinds = ["planned"] }]
[[plan.group]]
members = ["vm2", "vm3"]
pre = [{ script = ["/bin/echo", "switch"] }]
''', extra=REPLICA + '''failover_dir = "fo"
[replica.reverse]
target = "https://site-a:8084"
cert = "b.pem"
key = "b.key"
ca = "ca.pem"
frequency = "30s"
''')
    c = load(tmp_path, text)
    assert c.replica.failover_dir == str(tmp_path / "fo")
    assert c.replica.test_failover_dir == str(tmp_path / "state" / "test-failover")
    assert c.replica.reverse["cert"] == str(tmp_path / "b.pem") and c.replica.reverse["frequency"] == "30s"
    plan = c.plans["site"]
    assert [g.members for g in plan.groups] == [["vm1"], ["vm2", "vm3"]]
    check, ask = plan.groups[0].post
    assert check.cmd == [str(tmp_path / "hooks" / "check"), "db"] and check.timeout == 60
    assert ask.text == "Is the database up?" and ask.kinds == ("planned",) and ask.timeout is None
    assert plan.groups[1].pre[0].cmd == ["/bin/echo", "switch"]


def test_plans_refused_with_their_field(tmp_path, disks):
    groups = "".join(f'[[plan.group]]\nmembers = ["m{k}"]\n' for k in range(8))
    text = conf(tmp_path, machine=f'''
[[plan]]
name = "big"
{groups}
[[plan]]
name = "bad"
color = "red"
[[plan.group]]
members = ["vm1", "vm1"]
pre = [{{ script = "x", manual = "y" }}, {{ manual = "ok", kinds = ["sideways"], timeout = -1 }}, 3]
[[plan.group]]
[[plan]]
name = "empty"
''', extra=REPLICA + '[replica.reverse]\nfrequency = "10m"\n')
    p = problems(tmp_path, text)
    assert "at most 7" in p["plan[big].group"]
    assert "unknown key" in p["plan[bad].color"]
    assert "already a member of plan[bad].group[0]" in p["plan[bad].group[0].members[1]"]
    assert "exactly one of script" in p["plan[bad].group[0].pre[0]"]
    assert "must be one of test, planned, unplanned" in p["plan[bad].group[0].pre[1].kinds[0]"]
    assert "between 0 and" in p["plan[bad].group[0].pre[1].timeout"]
    assert "must be a table" in p["plan[bad].group[0].pre[2]"]
    assert "is empty" in p["plan[bad].group[1]"]
    assert "at least one [[plan.group]]" in p["plan[empty].group"]
    assert "30s, 5m or 15m" in p["replica.reverse.frequency"]
    p = problems(tmp_path, conf(tmp_path, machine='[[plan]]\nname = "p"\n[[plan.group]]\nmembers = ["vm1"]\n'))
    assert "no [replica]" in p["plan[p]"]


def test_replication_cpus(tmp_path, disks):
    """The syntax only: which CPUs replicatord may use, the daemon checks (tests/daemon/test_replication_cpus.py)."""
    cfg = load(tmp_path, conf(tmp_path, extra='replication_cpus = "0-2,5"'))
    assert cfg.daemon.replication_cpus == {0, 1, 2, 5}
    assert load(tmp_path, conf(tmp_path)).daemon.replication_cpus is None
    assert load(tmp_path, conf(tmp_path, extra='replication_cpus = "4095"')).daemon.replication_cpus == {4095}
    p = problems(tmp_path, conf(tmp_path, extra='replication_cpus = "0-"'))
    assert p == {"daemon.replication_cpus": "'0-' is not a CPU list (like 1 or 0-3,8)"}
    assert problems(tmp_path, conf(tmp_path, extra="replication_cpus = 1")) == {
        "daemon.replication_cpus": "must be a string, not an integer"}


def test_memory_logs(tmp_path, disks):
    """The host's budget for change logs in memory (tracking/memlogs.py): auto (None), none (0) or a size."""
    assert load(tmp_path, conf(tmp_path)).daemon.memory_logs is None
    assert load(tmp_path, conf(tmp_path, extra='memory_logs = "auto"')).daemon.memory_logs is None
    assert load(tmp_path, conf(tmp_path, extra='memory_logs = "none"')).daemon.memory_logs == 0
    assert load(tmp_path, conf(tmp_path, extra='memory_logs = "1.5G"')).daemon.memory_logs == 3 << 29
    assert load(tmp_path, conf(tmp_path, extra='memory_logs = "512MiB"')).daemon.memory_logs == 512 << 20
    for bad in ('"2G/s"', '"lots"', '"-1G"', '"0.5"'):
        p = problems(tmp_path, conf(tmp_path, extra=f"memory_logs = {bad}"))
        assert list(p) == ["daemon.memory_logs"] and "auto" in p["daemon.memory_logs"], (bad, p)
    assert problems(tmp_path, conf(tmp_path, extra="memory_logs = 1")) == {
        "daemon.memory_logs": "must be a string, not an integer"}
