"""[daemon] metrics_listen: Prometheus scrapes replicatord from another host with a token of its own, which
reads /metrics and nothing else; the admin API stays on loopback with the admin token."""
from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from replicator.orchestration.settings import ConfigError, parse_config

from .primary_harness import Daemon, free_port


def _get(url: str, token: str, method: str = "GET") -> tuple[int, str]:
    req = urllib.request.Request(url, method=method, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_metrics_listener_serves_metrics_only_with_its_own_token(tmp_path):
    d = Daemon(tmp_path)
    port = free_port()
    text = open(d.config).read().replace("[daemon]\n", f'[daemon]\nmetrics_listen = "0.0.0.0:{port}"\n', 1)
    open(d.config, "w").write(text)
    try:
        d.start(until="Replicating")
        admin = (tmp_path / "state" / "admin.token").read_text().strip()
        metrics = (tmp_path / "state" / "metrics.token").read_text().strip()
        assert (tmp_path / "state" / "metrics.token").stat().st_mode & 0o077 == 0
        base = f"http://127.0.0.1:{port}"
        code, body = _get(base + "/metrics", metrics)
        assert code == 200 and 'replicator_health{machine="vm01"}' in body
        assert _get(base + "/metrics", admin)[0] == 401          # the admin token is not a scraper's
        assert _get(base + "/v1/status", metrics)[0] == 404
        assert _get(base + "/v1/machines/vm01/pause", metrics, "POST")[0] == 404
        assert _get(f"http://127.0.0.1:{d.port}/v1/status", metrics)[0] == 401   # nor the reverse
    finally:
        d.stop()


@pytest.mark.parametrize("value", ["9185", "nowhere:80", "0.0.0.0:0", "0.0.0.0:70000"])
def test_a_bad_metrics_listen_is_named(value):
    with pytest.raises(ConfigError) as e:
        parse_config(f'[daemon]\nstate_dir = "/tmp/s"\nmetrics_listen = "{value}"\n[replica]\n'
                     'allow = [{principal = "a", storage = "/r"}]\n')
    assert any(p == "daemon.metrics_listen" for p, _ in e.value.problems), e.value.problems
