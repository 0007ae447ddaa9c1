"""`replicator bench cpu` with tiny sizes, and the argument parsers of `bench copy-frequency`."""
from __future__ import annotations

import argparse

import pytest

from replicator.cli import bench
from replicator.errors import UsageError


def run(argv):
    p = argparse.ArgumentParser(prog="replicator")
    bench.register(p.add_subparsers(dest="area", required=True))
    args = p.parse_args(argv)
    return args.func(args)


def test_bench_cpu_prints_each_line(capsys):
    assert run(["bench", "cpu", "--size", "1M", "--runs", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("kernels:")
    body = lines[1:]
    assert len(body) == 8 and all("GB/s" in line for line in body)
    for needle in ("CRC-32C", "XXH3-128", "zero detection", "zstd -1 compress", "zstd -1 decompress", "TLS"):
        assert any(needle in line for line in body), needle


def test_rates_and_durations():
    assert bench.parse_rate("5M") == 5 * 2**20
    assert bench.parse_rate("100Mbit") == 100e6 / 8
    assert bench.parse_rate("512KiB/s") == 512 * 1024
    assert bench.parse_duration("30s") == 30 and bench.parse_duration("15m") == 900
    assert bench.parse_duration("1h") == 3600 and bench.parse_duration("90") == 90
    for bad in ("fast", "0", "-1M"):
        with pytest.raises(UsageError):
            bench.parse_rate(bad)
    with pytest.raises(UsageError):
        bench.parse_duration("soon")


def test_copy_frequency_end_to_end(tmp_path, capsys):
    assert run(["bench", "copy-frequency", "--workload", "append", "--rate", "20K", "--duration", "1m",
                "--disk-size", "8M", "--frequencies", "20s,1m", "--link", "1Mbit", "--work", str(tmp_path),
                "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "markdown:" in out and (tmp_path / "out" / "copy-frequency-append.png").exists()
