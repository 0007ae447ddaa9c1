"""`replicator vhdx create | info | check | convert | cat`, driven through replicator.cli.main (exit codes,
stdout, stderr) and once end to end through the installed console script. Results are checked against
the engine's own reader, the raw bytes written, and qemu-img."""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys

import pytest

from replicator.cli import main
from replicator.vhdx import VhdxDisk, create_vhdx

from ..externals import qemu_check, qemu_compare, qemu_raw, run

KiB, MiB = 1 << 10, 1 << 20
HEADERS = (64 * KiB, 128 * KiB)


def cli(*argv) -> int:
    return main([str(a) for a in argv])


def info_json(capsys, path) -> dict:
    capsys.readouterr()
    assert cli("vhdx", "info", "--json", path) == 0
    return json.loads(capsys.readouterr().out)


def pattern(size: int) -> bytes:
    """Data with holes: random-looking bytes, a run of zeros and a tail that is not block-aligned."""
    out = bytearray(size)
    out[:MiB + 4096] = (bytes(range(251)) * (MiB // 251 + 20))[:MiB + 4096]
    out[3 * MiB + 512:3 * MiB + 512 + 7000] = b"\x5a" * 7000
    out[size - 1000:] = b"\xe7" * 1000
    return bytes(out)


def bat_offset(path) -> int:
    with VhdxDisk.open(str(path)) as d:
        return d.bat_offset


# ------------------------------------------------------------------------------------------ create / info
def test_create_dynamic_and_info_json(tmp_path, capsys):
    path = tmp_path / "d.vhdx"
    assert cli("vhdx", "create", path, "64M", "--block-size", "2M") == 0
    out = capsys.readouterr().out
    assert "dynamic" in out and str(path) in out
    info = info_json(capsys, path)
    assert info["virtual_size"] == 64 * MiB
    assert info["block_size"] == 2 * MiB
    assert info["subformat"] == "dynamic"
    assert info["logical_sector_size"] == 512
    assert info["physical_sector_size"] == 4096
    assert info["format"] == "vhdx"
    assert info["block_states"] == {"NOT_PRESENT": 32}
    q = json.loads(run("qemu-img", "info", "--output=json", "-f", "vhdx", path).stdout)
    assert q["virtual-size"] == 64 * MiB and q["cluster-size"] == 2 * MiB
    assert qemu_check(path).returncode == 0


def test_info_text_output(tmp_path, capsys):
    path = tmp_path / "d.vhdx"
    create_vhdx(str(path), 3 * MiB, block_size=MiB).close()
    capsys.readouterr()
    assert cli("vhdx", "info", path) == 0
    lines = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert lines["virtual_size"] == str(3 * MiB)
    assert lines["subformat"] == "dynamic"
    assert lines["block_states"] == "NOT_PRESENT=3"


@pytest.mark.parametrize("lss,pss", [(512, 4096), (4096, 512)])
def test_create_fixed(tmp_path, capsys, lss, pss):
    path = tmp_path / "f.vhdx"
    assert cli("vhdx", "create", path, "6M", "--fixed", "--block-size", "1M", "--logical-sector-size", lss,
               "--physical-sector-size", pss) == 0
    assert "fixed" in capsys.readouterr().out
    info = info_json(capsys, path)
    assert info["subformat"] == "fixed"
    assert info["virtual_size"] == 6 * MiB and info["block_size"] == MiB
    assert info["logical_sector_size"] == lss and info["physical_sector_size"] == pss
    assert info["block_states"] == {"FULLY_PRESENT": 6}
    assert os.path.getsize(path) >= 6 * MiB
    with VhdxDisk.open(str(path)) as d:
        assert d.read(0, d.size) == bytes(6 * MiB)
    if lss == 512:                                          # qemu 7.2 only opens 512-byte logical sectors
        assert qemu_raw(path, out=str(tmp_path / "f.raw")) == bytes(6 * MiB)
        assert qemu_check(path).returncode == 0


def test_create_differencing(tmp_path, capsysbinary):
    parent, child = tmp_path / "p.vhdx", tmp_path / "c.vhdx"
    data = pattern(8 * MiB)
    with create_vhdx(str(parent), 8 * MiB, block_size=MiB, logical_sector_size=4096) as p:
        p.write(0, data)
    assert cli("vhdx", "create", child, "--parent", parent, "--block-size", "1M") == 0
    assert b"differencing" in capsysbinary.readouterr().out
    assert cli("vhdx", "info", "--json", child) == 0
    info = json.loads(capsysbinary.readouterr().out)
    assert info["subformat"] == "differencing"
    assert info["virtual_size"] == 8 * MiB and info["block_size"] == MiB
    assert info["logical_sector_size"] == 4096          # inherited from the parent
    assert info["parent"] == str(parent)
    assert info["parent_locator"]["relative_path"] == "p.vhdx"
    assert cli("vhdx", "cat", child) == 0
    assert capsysbinary.readouterr().out == data
    with VhdxDisk.open(str(parent)) as p:
        assert info["parent_locator"]["parent_linkage"].strip("{}") == str(p.data_write_guid)


# ------------------------------------------------------------------------------------------ check
def test_check_good_file(tmp_path, capsys):
    path = tmp_path / "d.vhdx"
    with create_vhdx(str(path), 8 * MiB, block_size=MiB) as d:
        d.write(MiB, b"\x01" * 5000)
    capsys.readouterr()
    assert cli("vhdx", "check", path) == 0
    out = capsys.readouterr()
    assert "no errors" in out.out and out.err == ""


@pytest.mark.parametrize("slot", [0, 1])
def test_check_corrupt_header_copy(tmp_path, capsys, slot):
    path = tmp_path / "d.vhdx"
    create_vhdx(str(path), 8 * MiB, block_size=MiB).close()
    with open(path, "r+b") as f:
        f.seek(HEADERS[slot] + 2000)
        f.write(b"\xff")
    capsys.readouterr()
    assert cli("vhdx", "check", path) == 7
    out = capsys.readouterr()
    assert f"header {slot + 1} at offset {HEADERS[slot]} " in out.out
    assert "1 problem" in out.err and "error" in out.err


def test_check_reserved_bat_bits(tmp_path, capsys):
    path = tmp_path / "d.vhdx"
    with create_vhdx(str(path), 8 * MiB, block_size=MiB) as d:
        d.write(2 * MiB, b"\x01" * MiB)
    bat = bat_offset(path)
    with open(path, "r+b") as f:
        f.seek(bat + 16)
        entry = struct.unpack("<Q", f.read(8))[0]
        assert entry & 7 == 6
        f.seek(bat + 16)
        f.write(struct.pack("<Q", entry | 1 << 12))
    with VhdxDisk.open(str(path)) as d:                 # still readable: reserved bits are not fatal
        assert d.read(2 * MiB, MiB) == b"\x01" * MiB
    capsys.readouterr()
    assert cli("vhdx", "check", path) == 7
    out = capsys.readouterr()
    assert f"BAT entry 2 at offset {bat + 16}" in out.out and "reserved" in out.out
    assert "1 problem" in out.err


def test_check_unopenable_file(tmp_path, capsys):
    path = tmp_path / "d.vhdx"
    create_vhdx(str(path), 8 * MiB, block_size=MiB).close()
    with open(path, "r+b") as f:
        for at in HEADERS:
            f.seek(at)
            f.write(b"HEAD")
    capsys.readouterr()
    assert cli("vhdx", "check", path) == 7
    out = capsys.readouterr().out
    assert f"offset {HEADERS[0]} " in out and f"offset {HEADERS[1]} " in out


def test_check_refuses_a_non_vhdx(tmp_path, capsys):
    path = tmp_path / "r.raw"
    path.write_bytes(bytes(MiB))
    assert cli("vhdx", "check", path) == 2
    assert "not a VHDX" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ convert
def test_convert_raw_vhdx_vhd_raw_round_trip(tmp_path, capsys):
    size = 12 * MiB + 4096
    data = pattern(size)
    raw, vhdx, vhd, back = (tmp_path / n for n in ("in.raw", "mid.vhdx", "mid.vhd", "out.raw"))
    raw.write_bytes(data)
    assert cli("vhdx", "convert", raw, vhdx, "-O", "vhdx", "--block-size", "1M") == 0
    assert cli("vhdx", "convert", vhdx, vhd, "-O", "vhd") == 0
    assert cli("vhdx", "convert", vhd, back, "-O", "raw") == 0
    assert back.read_bytes() == data
    out = capsys.readouterr().out
    assert out.count("converted") == 3
    info = info_json(capsys, vhdx)
    assert info["virtual_size"] == size and info["block_size"] == MiB and info["subformat"] == "dynamic"
    # dynamic: only blocks that hold data were allocated (blocks 0, 1, 3 and the last one)
    assert info["block_states"]["FULLY_PRESENT"] == 4
    res = qemu_compare(vhdx, raw)
    assert res.returncode == 0 and b"identical" in res.stdout, res.stdout + res.stderr
    assert qemu_check(vhdx).returncode == 0
    res = run("qemu-img", "compare", "--image-opts",
              f"driver=vpc,force_size_calc=current_size,file.filename={vhd}",
              f"driver=raw,file.filename={raw}", check=False)
    assert res.returncode == 0 and b"identical" in res.stdout, res.stdout + res.stderr


def test_convert_to_fixed_vhdx(tmp_path, capsys):
    data = pattern(4 * MiB)
    raw, vhdx = tmp_path / "in.raw", tmp_path / "f.vhdx"
    raw.write_bytes(data)
    assert cli("vhdx", "convert", raw, vhdx, "-O", "vhdx", "--subformat", "fixed", "--block-size", "1M") == 0
    info = info_json(capsys, vhdx)
    assert info["subformat"] == "fixed" and info["block_states"] == {"FULLY_PRESENT": 4}
    assert qemu_raw(vhdx, out=str(tmp_path / "q.raw")) == data


def test_convert_qemu_vhdx_to_raw(tmp_path):
    q, out = tmp_path / "q.vhdx", tmp_path / "out.raw"
    run("qemu-img", "create", "-q", "-f", "vhdx", "-o", "block_size=1M", q, 5 * MiB)
    run("qemu-io", "-f", "vhdx", "-c", "write -P 0x3c 1M 5000", "-c", "write -P 0x4d 4M 1M", q)
    assert cli("vhdx", "convert", q, out, "-O", "raw") == 0
    assert out.read_bytes() == qemu_raw(q, out=str(tmp_path / "q.raw"))


def test_convert_refuses_existing_target(tmp_path, capsys):
    raw, target = tmp_path / "in.raw", tmp_path / "t.vhdx"
    raw.write_bytes(pattern(2 * MiB))
    target.write_bytes(b"keep me")
    assert cli("vhdx", "convert", raw, target, "-O", "vhdx") == 2
    err = capsys.readouterr().err
    assert "already exists" in err and str(target) in err
    assert target.read_bytes() == b"keep me"


def test_convert_of_a_corrupt_source_leaves_no_target(tmp_path, capsys):
    src, target = tmp_path / "bad.vhdx", tmp_path / "t.raw"
    create_vhdx(str(src), 2 * MiB, block_size=MiB).close()
    with open(src, "r+b") as f:
        for at in HEADERS:
            f.seek(at + 8)
            seq = f.read(1)[0]
            f.seek(at + 8)
            f.write(bytes([seq ^ 0x80]))
    assert cli("vhdx", "convert", src, target, "-O", "raw") == 3        # FormatError
    assert f"offset {HEADERS[0]} " in capsys.readouterr().err
    assert not target.exists()


# ------------------------------------------------------------------------------------------ cat
@pytest.fixture
def filled(tmp_path):
    path = tmp_path / "d.vhdx"
    data = pattern(6 * MiB)
    with create_vhdx(str(path), 6 * MiB, block_size=MiB) as d:
        d.write(0, data)
    return path, data


def test_cat_whole_disk(filled, capsysbinary):
    path, data = filled
    capsysbinary.readouterr()
    assert cli("vhdx", "cat", path) == 0
    out = capsysbinary.readouterr()
    assert out.out == data and out.err == b""


@pytest.mark.parametrize("offset,length", [("0", "1"), ("1000", "5000"), ("1M", "4K"), ("3145600", "1M"),
                                           ("6M", "0"), (str(6 * MiB - 10), None)])
def test_cat_offset_length(filled, capsysbinary, offset, length):
    path, data = filled
    args = ["vhdx", "cat", path, "--offset", offset] + (["--length", length] if length is not None else [])
    capsysbinary.readouterr()
    assert cli(*args) == 0
    units = {"K": KiB, "M": MiB}
    num = lambda s: int(s[:-1]) * units[s[-1]] if s[-1] in units else int(s)      # noqa: E731
    start = num(offset)
    end = start + num(length) if length is not None else len(data)
    assert capsysbinary.readouterr().out == data[start:end]


def test_cat_past_the_end(filled, capsysbinary):
    path, _ = filled
    assert cli("vhdx", "cat", path, "--offset", "6M", "--length", "1") == 9       # OutOfRange
    assert b"outside the virtual disk" in capsysbinary.readouterr().err


# ------------------------------------------------------------------------------------------ usage errors
def test_create_without_size(tmp_path, capsys):
    path = tmp_path / "d.vhdx"
    assert cli("vhdx", "create", path) == 2
    out = capsys.readouterr()
    assert "SIZE is required" in out.err and out.out == ""
    assert not path.exists()


def test_create_with_size_and_parent(tmp_path, capsys):
    parent = tmp_path / "p.vhdx"
    create_vhdx(str(parent), MiB, block_size=MiB).close()
    assert cli("vhdx", "create", tmp_path / "c.vhdx", "1M", "--parent", parent) == 2
    assert "SIZE" in capsys.readouterr().err
    assert not (tmp_path / "c.vhdx").exists()


def test_create_over_existing_file(tmp_path, capsys):
    path = tmp_path / "d.vhdx"
    path.write_bytes(b"precious")
    assert cli("vhdx", "create", path, "8M") == 2
    err = capsys.readouterr().err
    assert "already exists" in err and str(path) in err
    assert path.read_bytes() == b"precious"
    assert sorted(os.listdir(tmp_path)) == ["d.vhdx"]     # no temporary file left behind


@pytest.mark.parametrize("size,block", [("0", "32M"), ("1000", "32M"), ("8M", "3M"), ("8M", "512K"), ("8Q", "32M")])
def test_create_bad_size_or_block_size(tmp_path, capsys, size, block):
    path = tmp_path / "d.vhdx"
    assert cli("vhdx", "create", path, size, "--block-size", block) == 2
    assert capsys.readouterr().err.startswith("replicator: error: ")
    assert not path.exists()


def test_info_of_a_missing_file(tmp_path, capsys):
    assert cli("vhdx", "info", tmp_path / "nope.vhdx") == 8     # DiskIOError
    assert "nope.vhdx" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ console script
def console_script() -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "replicator")
    if os.path.exists(exe):
        return [exe]
    found = shutil.which("replicator")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from replicator.cli import main; sys.exit(main())"]


def test_console_script_end_to_end(tmp_path):
    cmd = console_script()

    def sh(*argv, input=None):
        return subprocess.run(cmd + [str(a) for a in argv], capture_output=True, timeout=120, input=input)

    raw, vhdx, child, back = (tmp_path / n for n in ("in.raw", "d.vhdx", "c.vhdx", "out.raw"))
    data = pattern(5 * MiB)
    raw.write_bytes(data)
    r = sh("vhdx", "convert", raw, vhdx, "-O", "vhdx", "--block-size", "1M")
    assert r.returncode == 0, r.stderr
    r = sh("vhdx", "create", child, "--parent", vhdx)
    assert r.returncode == 0 and b"differencing" in r.stdout, r.stderr
    r = sh("vhdx", "info", "--json", child)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert (info["subformat"], info["virtual_size"], info["logical_sector_size"]) == ("differencing", 5 * MiB, 512)
    r = sh("vhdx", "cat", child)
    assert r.returncode == 0 and r.stdout == data
    r = sh("vhdx", "cat", child, "--offset", "1000", "--length", "3M")
    assert r.stdout == data[1000:1000 + 3 * MiB]
    r = sh("vhdx", "check", child)
    assert r.returncode == 0 and b"no errors" in r.stdout
    r = sh("vhdx", "convert", child, back, "-O", "raw")
    assert r.returncode == 0 and back.read_bytes() == data
    # errors: the exit code is the exception's, the message goes to stderr
    r = sh("vhdx", "create", tmp_path / "x.vhdx")
    assert r.returncode == 2 and b"SIZE is required" in r.stderr and r.stdout == b""
    r = sh("vhdx", "convert", raw, back, "-O", "raw")
    assert r.returncode == 2 and b"already exists" in r.stderr
    with open(vhdx, "r+b") as f:
        f.seek(HEADERS[0] + 100)
        f.write(b"\x42")
    r = sh("vhdx", "check", vhdx)
    assert r.returncode == 7 and f"offset {HEADERS[0]} ".encode() in r.stdout
    # the parent's header damage does not change what the child reads, but check reports it
    r = sh("vhdx", "check", child)
    assert r.returncode == 7 and b"parent" in r.stdout
