"""bench/guest_impact.py --quick end to end: qemu-nbd, and replicatord (primary and replica over mutual TLS)
paused, cycling, during an initial replication and during a checksum resync, each with fio through the
export. The figures mean little on a 256 MiB disk with 5 s jobs; the test checks the benchmark works and
that every phase saw the guest's I/O."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PHASES = "eabcd"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_guest_impact_quick(tmp_path):
    for tool in ("fio", "qemu-nbd", "qemu-img", "mke2fs"):
        assert shutil.which(tool), f"{tool} is needed (tools/bootstrap installs it)"
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "guest_impact.py"), "--quick",
                        "--work", str(tmp_path / "work")], capture_output=True, text=True, timeout=280, cwd=ROOT)
    elapsed = time.monotonic() - t0
    assert p.returncode == 0, p.stderr[-4000:]
    report = json.loads((tmp_path / "work" / "guest-impact.json").read_text())
    assert (tmp_path / "work" / "guest-impact.md").read_text().startswith("# Guest impact")
    jobs = report["setup"]["jobs"]
    assert jobs and not report["problems"]
    for phase in PHASES:
        for job in jobs:
            r = report["phases"][phase][job]
            assert r["iops"] > 0 and r["ios"] > 0, (phase, job, r)
            assert 0 < r["median_ms"] <= r["p99_ms"] <= r["p999_ms"] <= r["max_ms"] < 30_000, (phase, job, r)
            assert r["window_s"] > 0
            # the CPU freeze watchers ran: a worst completion less the freezes is never above the worst
            assert r["freezes"] >= 0 and 0 <= r["max_ms_less_freezes"] <= r["max_ms"], (phase, job, r)
            if phase != "e" or r.get("server_cores") is not None:
                assert r["server_cores"] > 0, (phase, job, r)     # the export (a-d) was found and measured
    for job in jobs:
        ratios = report["ratios"][job]
        for key in ("steady_over_paused_iops", "paused_over_qemu_iops", "steady_over_qemu_iops"):
            assert ratios[key] > 0, (job, key, ratios)
        assert set(ratios["worst_minus_qemu_ms"]) == set("abcd") == set(ratios["worst_minus_qemu_less_freezes_ms"])
        assert all(v > 0 for v in ratios["p999_over_qemu"].values()), ratios
    assert report["phases"]["b"][jobs[0]]["cycles"] >= 1
    assert all(report["phases"]["d"][j]["resyncs"] for j in jobs)
    assert all(report["phases"]["c"][j]["initial_bytes"] for j in jobs)
    # fio writes through the whole copy: it is held back (the count comes from the cycle's log line)
    assert all(report["phases"]["c"][j]["paced_s"] > 0 for j in jobs)
    assert elapsed < 90, f"--quick took {elapsed:.0f} s (the smoke test's budget is 90 s)"
