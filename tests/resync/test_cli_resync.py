"""`replicator resync` and `replicator scan` through replicator.cli.main: output, JSON, exit codes."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

import replicator.cli as cli_mod
from replicator.cli import resync as resync_cmd

from ..externals import qemu_compare
from .diskutil import contents, create, fill, reopen

MiB = 1 << 20


@pytest.fixture
def cli(monkeypatch):
    """main() with the resync commands registered (they are, once cli/__init__ registers them itself)."""
    build = cli_mod.build_parser

    def build_with_resync():
        parser = build()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        if "resync" not in sub.choices:
            resync_cmd.register(sub)
        return parser

    monkeypatch.setattr(cli_mod, "build_parser", build_with_resync)
    return lambda *argv: cli_mod.main([str(a) for a in argv])


def _pair(tmp_path, fmt_t="raw"):
    rng = np.random.default_rng(9)
    s, t = tmp_path / "src.raw", tmp_path / f"dst.{fmt_t}"
    with create(s, "raw", 4 * MiB) as a, create(t, fmt_t, 4 * MiB) as b:
        fill(a, rng, [(0, 3 * MiB, "data")])
        b.write(0, a.read(0, 4 * MiB))
        fill(b, rng, [(65536 * 3 + 5, 10, "data"), (2 * MiB, 65536, "zero")])
    return s, t


def test_resync_round_trip(tmp_path, cli, capsys):
    s, t = _pair(tmp_path, "vhdx")
    assert cli("resync", "--dry-run", s, t) == 0
    out = capsys.readouterr().out
    assert "blocks differing  2 in 2 extents" in out and "would copy" in out
    assert contents(t) != contents(s)
    assert cli("resync", s, t) == 0
    out = capsys.readouterr().out
    assert "blocks compared   64 x 64.00 KiB" in out and "copied            128.00 KiB" in out
    assert qemu_compare(t, s, "vhdx", "raw").returncode == 0
    assert cli("resync", "--json", s, t) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["blocks_differing"] == 0 and doc["source_from_manifest"] and doc["target_from_manifest"]
    assert doc["source_bytes_read"] == doc["target_bytes_read"] == 0
    assert (tmp_path / "src.raw.digests").exists() and (tmp_path / "dst.vhdx.digests").exists()


def test_resync_options(tmp_path, cli, capsys):
    s, t = _pair(tmp_path)
    mdir = tmp_path / "manifests"
    mdir.mkdir()
    assert cli("resync", "--block-size", "4K", "--manifest-dir", mdir, "--json", s, t) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["block_size"] == 4096 and doc["changes"]["extents"][0] == {"offset": 65536 * 3, "length": 4096}
    assert len(list(mdir.iterdir())) == 2 and not (tmp_path / "src.raw.digests").exists()
    assert cli("resync", "--no-manifest", s, t) == 0
    assert "source read       3.00 MiB" in capsys.readouterr().out      # its last MiB is a hole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst.raw", "manifests", "src.raw"]


def test_resync_errors(tmp_path, cli, capsys):
    s, _ = _pair(tmp_path)
    with create(tmp_path / "small.raw", "raw", MiB):
        pass
    assert cli("resync", s, tmp_path / "small.raw") == 2
    assert "same virtual size" in capsys.readouterr().err
    assert cli("resync", "--block-size", "3000", s, s) == 2
    assert cli("resync", s, tmp_path / "missing.raw") == 8


def test_scan_round_trip(tmp_path, cli, capsys):
    s, _ = _pair(tmp_path)
    assert cli("scan", s) == 0
    assert "no earlier manifest" in capsys.readouterr().out
    with reopen(s, read_only=False) as d:
        d.write(MiB + 100, b"changed")
    assert cli("scan", "--json", "--no-save", s) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["extents"] == [{"offset": MiB, "length": 65536}] and not doc["baseline"]
    assert cli("scan", s, "--manifest", tmp_path / "src.raw.digests") == 0
    assert f"extent {MiB:>14} +65536" in capsys.readouterr().out
    assert cli("scan", s) == 0
    assert "unchanged since the manifest" in capsys.readouterr().out
    (tmp_path / "src.raw.digests").write_bytes(b"junk")
    assert cli("scan", s) == 3
    assert "digest manifest header at offset 0" in capsys.readouterr().err
