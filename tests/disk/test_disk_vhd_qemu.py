"""VHD interop with qemu 7.2: our files read by qemu, qemu's files read by us, and how qemu sizes a VHD
(see the replicator.disk.vhd module docstring)."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicator.disk.raw import create_raw
from replicator.disk.vhd import chs_geometry, create_vhd, open_vhd

from .vhdtools import (QEMU_IMG, build_dynamic, needs_qemu, qemu_io, qemu_to_raw,
                       qemu_virtual_size, run, vpc_spec)

pytestmark = needs_qemu
MIB = 1 << 20


def our_bytes(path) -> bytes:
    with open_vhd(path) as d:
        return d.read(0, d.size)


def test_qemu_size_rules_for_our_fixed_vhd(tmp_path):
    """qemu uses CHS*512 for an unknown creator ("rplc") unless told force_size_calc=current_size;
    for creator "win " it uses Current Size on its own."""
    size = 10 * MIB
    c, h, s = chs_geometry(size)
    create_vhd(tmp_path / "ours.vhd", size).close()
    assert qemu_virtual_size(tmp_path / "ours.vhd") == c * h * s * 512 < size
    assert qemu_virtual_size(tmp_path / "ours.vhd", current_size=True) == size
    create_vhd(tmp_path / "win.vhd", size, creator_app="win ").close()
    assert qemu_virtual_size(tmp_path / "win.vhd") == size


def test_qemu_reads_what_we_wrote(tmp_path):
    size = 6 * MIB
    shadow = bytearray(size)
    with create_vhd(tmp_path / "a.vhd", size, azure=True) as d, \
            create_raw(tmp_path / "shadow.raw", size) as r:
        for off, n, b in [(0, 512, 1), (MIB - 7, 4099, 2), (5 * MIB, MIB, 3), (100, 10, 0)]:
            d.write(off, bytes([b]) * n)
            r.write(off, bytes([b]) * n)
            shadow[off:off + n] = bytes([b]) * n
    assert qemu_to_raw(tmp_path / "a.vhd", tmp_path / "a.raw") == shadow
    res = run(QEMU_IMG, "compare", "--image-opts", vpc_spec(tmp_path / "a.vhd"),
              f"driver=raw,file.filename={tmp_path / 'shadow.raw'}")
    assert "identical" in res.stdout
    qemu_io(tmp_path / "a.vhd", "read -P 3 5M 1M", "read -P 0 1536 1000", spec=True)


def test_qemu_img_check_on_our_file(tmp_path):
    """qemu-img has no consistency check for vpc (exit 63, 'does not support checks'); if a later
    qemu adds one, our files must pass it."""
    create_vhd(tmp_path / "a.vhd", 2 * MIB).close()
    res = run(QEMU_IMG, "check", "-f", "vpc", tmp_path / "a.vhd", check=False)
    assert res.returncode == 0 or (res.returncode == 63 and "not support" in res.stderr)


def test_qemu_io_writes_into_our_fixed_vhd(tmp_path):
    p = tmp_path / "a.vhd"
    create_vhd(p, 4 * MIB).close()
    qemu_io(p, "write -P 0x5a 1M 64k", "write -P 0x66 4190208 4096", spec=True)
    data = our_bytes(p)
    assert data[MIB:MIB + 65536] == b"\x5a" * 65536 and data[-4096:] == b"\x66" * 4096
    assert data == qemu_to_raw(p, tmp_path / "a.raw")
    assert open_vhd(p).footer.current_size == 4 * MIB


@pytest.mark.parametrize("subformat", ["fixed", "dynamic"])
@pytest.mark.parametrize("force_size", [False, True])
def test_we_read_qemu_vhds(tmp_path, subformat, force_size):
    p = tmp_path / "q.vhd"
    opts = f"subformat={subformat}" + (",force_size=on" if force_size else "")
    run(QEMU_IMG, "create", "-q", "-f", "vpc", "-o", opts, p, "7M")
    qemu_io(p, "write -P 0xab 1M 64k", "write -P 0xcd 4M 12k", "write -P 0x01 7167k 1k")
    with open_vhd(p) as d:
        assert d.subformat == subformat
        assert d.size == qemu_virtual_size(p)            # qemu's own files agree on the size
        if force_size:
            assert d.size == 7 * MIB
        data = d.read(0, d.size)
        ext = list(d.extents())
    assert data == qemu_to_raw(p, tmp_path / "q.raw", current_size=False)
    assert data[MIB:MIB + 65536] == b"\xab" * 65536
    assert data[7167 * 1024:7 * MIB] == b"\x01" * 1024
    for e in ext:
        if e.kind.value == "zero":
            assert not any(data[e.offset:e.end])
    if subformat == "dynamic":   # 2 MiB blocks: 0, 2 and 3 were written
        assert [(e.offset, e.kind.value) for e in ext][:2] == [(0, "data"), (2 * MIB, "zero")]


def test_qemu_reads_our_bitmapped_dynamic_builder(tmp_path):
    """The test-side dynamic builder agrees with qemu (so dynamic tests do not only check us
    against ourselves). qemu ignores sector bitmaps, so cleared sectors hold zeros here."""
    blk = b"\x10" * 1024 + bytes(3072)
    lay = build_dynamic(40 * 1024, 4096, {0: b"\x20" * 4096, 2: (blk, b"\xc0"), 9: b"\x30" * 9})
    p = tmp_path / "b.vhd"
    p.write_bytes(lay.data)
    assert our_bytes(p) == qemu_to_raw(p, tmp_path / "b.raw")


writes = st.lists(st.tuples(st.integers(0, 3 * MIB - 1), st.integers(1, 300_000),
                            st.integers(0, 255), st.booleans()), min_size=1, max_size=10)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=writes)
def test_random_writes_match_shadow_and_qemu(tmp_path, ops):
    size = 3 * MIB
    shadow = bytearray(size)
    p = tmp_path / "h.vhd"
    with create_vhd(p, size, overwrite=True) as d:
        for off, n, byte, zero in ops:
            n = min(n, size - off)
            if zero:
                d.write_zeroes(off, n)
                shadow[off:off + n] = bytes(n)
            else:
                d.write(off, bytes([byte]) * n)
                shadow[off:off + n] = bytes([byte]) * n
        assert d.read(0, size) == shadow
    assert qemu_to_raw(p, tmp_path / "h.raw") == shadow
    assert our_bytes(p) == shadow
