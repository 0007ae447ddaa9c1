"""The copy-frequency simulation on a tiny disk: consistent numbers, and a recommendation that follows the link."""
from __future__ import annotations

import json

import pytest

from replicator.bench import copyfreq, workloads

MiB = 1 << 20


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    # rewrite-heavy: 2.4 MB of hot-spot writes over a 16 MiB disk
    wl = workloads.synthetic("zipf", disk_size=16 * MiB, rate=20_000, duration=120, seed=3)
    runs = copyfreq.run_all(wl, [10, 60], workdir=str(tmp_path_factory.mktemp("cf")))
    yield wl, runs
    wl.close()


def test_every_write_is_accounted_for(sim):
    wl, runs = sim
    for r in runs:
        assert sum(c.writes for c in r.cycles) == len(wl.t)
        assert sum(c.written_bytes for c in r.cycles) == wl.bytes_written
        assert all(c.kind == "delta" for c in r.cycles)
        a = copyfreq.analyze(r, 1e9)
        assert a["cycles"] == len(r.cycles) and a["compression_ratio"] > 1
        assert a["cpu_primary_s"] > 0 and a["cpu_replica_s"] > 0


def test_frequent_cycles_ship_more_and_lose_less(sim):
    _, (often, rarely) = sim
    a, b = copyfreq.analyze(often, 1e9), copyfreq.analyze(rarely, 1e9)
    assert a["changed_bytes"] >= b["changed_bytes"]          # a rewritten block travels once per cycle
    assert a["bytes_shipped"] >= b["bytes_shipped"] * 0.95   # compression of different frames varies a little
    assert a["rpo_median_s"] < b["rpo_median_s"] and a["rpo_max_s"] < b["rpo_max_s"]
    assert b["log_peak_share_of_threshold"] > a["log_peak_share_of_threshold"]


def test_rpo_grows_as_the_link_shrinks(sim):
    _, runs = sim
    # below the slowest link that keeps every cycle within half its interval, some cycle must overrun
    fast, slow = copyfreq.analyze(runs[0], 1e9), copyfreq.analyze(runs[0], copyfreq.min_link(runs[0]) / 4)
    assert slow["rpo_p99_s"] > fast["rpo_p99_s"]
    assert fast["within_half"] == fast["cycles"] > slow["within_half"]


def test_recommendation_follows_the_link(sim):
    _, runs = sim
    assert copyfreq.recommend(runs, 1e9)["frequency"] == 10
    thin = copyfreq.recommend(runs, 10.0)
    assert thin["frequency"] is None and "no frequency" in thin["text"]
    need_often, need_rarely = copyfreq.min_link(runs[0]), copyfreq.min_link(runs[1])
    assert need_often > need_rarely
    between = (need_often * need_rarely) ** 0.5
    assert copyfreq.recommend(runs, between)["frequency"] == 60
    assert copyfreq.recommend(runs, need_often * 1.01)["frequency"] == 10


def test_reports_are_written(sim, tmp_path):
    wl, runs = sim
    paths = copyfreq.write_reports(wl, runs, 1e6, str(tmp_path), {"host": "test", "command": "pytest"})
    md = open(paths["markdown"]).read()
    assert "## Recommendation" in md and "| 10 s |" in md and "copy-frequency-zipf.png" in md
    assert open(paths["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    doc = json.load(open(paths["json"]))
    assert doc["recommendation"]["frequency"] == 10 and len(doc["runs"]) == 2
