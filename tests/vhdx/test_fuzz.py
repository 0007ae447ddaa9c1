"""Fuzzing the VHDX parser: mutated copies of three small valid files (ours dynamic, ours differencing
over ours, qemu dynamic written by qemu-io) are opened read-only and read-write, read, scanned for
extents, written to, and checked. Each step must work or raise a ReplicatorError subclass -- never any
other exception, never a hang (SIGALRM after 20 s per example) -- and must keep these promises:

- a read-only open, read or check never changes the file (nor the parent of a differencing disk);
- a file refused read-only (other than for a pending log) is refused read-write too, and when both
  opens work they read the same bytes;
- extents cover the disk in order, and every ZERO extent reads as zeros;
- `check_vhdx` returns a list, and reports at least one problem for a file that does not open;
- a file the engine accepted read-write, then wrote to and closed, reopens and reads back the write.

Mutations: byte flips anywhere in the first 4 MiB or inside a chosen structure (headers, region tables,
metadata table and items, BAT, log), truncation and extension, field rewrites with the CRC-32C fixed up
so validation goes past the checksum, BAT entries aimed at interesting places, and a staged log entry
(LogGuid set in both headers) that later mutations may damage. Hypothesis drives the exploration; a
marker-free fixed-seed batch makes CI reproducible.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import random
import signal
import struct
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicator.disk.base import ExtentKind
from replicator.errors import LogReplayRequired, ReplicatorError
from replicator.kernels import crc32c
from replicator.vhdx import VhdxDisk, create_vhdx
from replicator.vhdx.check import check_vhdx
from replicator.vhdx.log import DataUpdate, ZeroUpdate, encode_entry

from ..externals import run

KiB, MiB = 1 << 10, 1 << 20
HEADERS = (64 * KiB, 128 * KiB)
REGION_TABLES = (192 * KiB, 256 * KiB)
BAT_GUID = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_GUID = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")
KNOWN_ITEMS = [uuid.UUID(g) for g in ("CAA16737-FA36-4D43-B3B6-33F0AA44E76B", "2FA54224-CD1B-4876-B211-5DBED83BF4B8",
                                      "BECA12AB-B2E6-4523-93EF-C309E000C746", "8141BF1D-A96F-4709-BA47-F233A8FAAB5F",
                                      "CDA348C7-445D-4471-9CC9-E9885251C556", "A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")]
LOG_GUID = uuid.UUID("5e1f0c2a-7d3b-4c6e-9a8f-0b1c2d3e4f50")
READ_LIMIT = 32 * MiB       # read whole disks up to this size; larger ones: head and tail only
TIME_LIMIT = 20


# ------------------------------------------------------------------------------------------ base images
@dataclass
class Base:
    name: str
    data: bytes = field(repr=False)
    spans: list = field(repr=False)      # (name, offset, length) of structures, for targeted flips
    fields: list = field(repr=False)     # (offset, struct format, crc): crc None, ("crc", start, length), ("log", start)
    bat_offset: int = field(repr=False)
    bat_entries: int = field(repr=False)
    bitmap_index: int | None = field(repr=False)
    targets: list = field(repr=False)    # interesting 1 MiB-aligned file offsets (structures, blocks, the end)
    log_offset: int = field(repr=False)
    parent: str | None = field(default=None, repr=False)


def _u(fmt, raw, at):
    return struct.unpack_from(fmt, raw, at)[0]


def describe(name: str, data: bytes, parent: str | None = None) -> Base:
    """Locate every structure of a valid image with struct (MS-VHDX §2.2-2.6 offsets)."""
    count = _u("<I", data, REGION_TABLES[0] + 8)
    regions = {}
    for i in range(count):
        at = REGION_TABLES[0] + 16 + 32 * i
        regions[uuid.UUID(bytes_le=data[at:at + 16])] = struct.unpack_from("<QI", data, at + 16)
    md_off, md_len = regions[METADATA_GUID]
    bat_off, bat_len = regions[BAT_GUID]
    log_len, log_off = struct.unpack_from("<IQ", data, HEADERS[0] + 68)
    n_md = _u("<H", data, md_off + 10)
    items = []
    for i in range(n_md):
        at = md_off + 32 + 32 * i
        g = uuid.UUID(bytes_le=data[at:at + 16])
        off, length = struct.unpack_from("<II", data, at + 16)
        items.append((g, off, length))
    fp_off = next(off for g, off, _ in items if g == KNOWN_ITEMS[0])
    block_size = _u("<I", data, md_off + fp_off)
    lss = _u("<I", data, md_off + next(off for g, off, _ in items if g == KNOWN_ITEMS[3]))
    disk_size = _u("<Q", data, md_off + next(off for g, off, _ in items if g == KNOWN_ITEMS[1]))
    ratio = (1 << 23) * lss // block_size
    n_payload = -(-disk_size // block_size)
    if parent:
        n_entries, bitmap_index = -(-n_payload // ratio) * (ratio + 1), ratio
    else:
        n_entries, bitmap_index = n_payload + (n_payload - 1) // ratio, None
    bat = struct.unpack_from(f"<{n_entries}Q", data, bat_off)
    blocks = sorted({e & ~0xFFFFF for e in bat if e & 7 in (6, 7)})

    spans = [("file identifier", 0, 16)]
    fields = []
    for h in HEADERS:
        spans.append(("header", h, 80))
        crc = ("crc", h, 4 * KiB)
        fields += [(h + 8, "<Q", crc), (h + 16, "16s", crc), (h + 32, "16s", crc), (h + 48, "16s", crc),
                   (h + 64, "<H", crc), (h + 66, "<H", crc), (h + 68, "<I", crc), (h + 72, "<Q", crc)]
    for r in REGION_TABLES:
        spans.append(("region table", r, 16 + 32 * (count + 1)))
        crc = ("crc", r, 64 * KiB)
        fields.append((r + 8, "<I", crc))
        for i in range(count + 1):
            at = r + 16 + 32 * i
            fields += [(at, "16s", crc), (at + 16, "<Q", crc), (at + 24, "<I", crc), (at + 28, "<I", crc)]
    spans.append(("metadata table", md_off, 32 + 32 * (n_md + 1)))
    fields.append((md_off + 10, "<H", None))
    for i in range(n_md + 1):
        at = md_off + 32 + 32 * i
        fields += [(at, "16s", None), (at + 16, "<I", None), (at + 20, "<I", None), (at + 24, "<I", None)]
    for g, off, length in items:
        spans.append(("metadata item", md_off + off, max(length, 1)))
        at = md_off + off
        if length >= 8:
            fields += [(at, "<Q", None), (at + 4, "<I", None)]
        fields.append((at, "<I", None))
        if g == KNOWN_ITEMS[5]:                      # parent locator: count and the key/value table
            fields.append((at + 18, "<H", None))
            for k in range(3):
                e = at + 20 + 12 * k
                fields += [(e, "<I", None), (e + 4, "<I", None), (e + 8, "<H", None), (e + 10, "<H", None)]
    spans.append(("BAT", bat_off, 8 * n_entries))
    spans.append(("log", log_off, 64 * KiB))
    le = ("log", log_off)
    fields += [(log_off + 8, "<I", le), (log_off + 12, "<I", le), (log_off + 16, "<Q", le), (log_off + 24, "<I", le),
               (log_off + 32, "16s", le), (log_off + 48, "<Q", le), (log_off + 56, "<Q", le),
               (log_off + 64, "4s", le), (log_off + 72, "<Q", le), (log_off + 80, "<Q", le), (log_off + 88, "<Q", le)]
    if bitmap_index is not None and bat[bitmap_index] & 7 == 6:
        spans.append(("sector bitmap", bat[bitmap_index] & ~0xFFFFF, 4 * KiB))
    if blocks:
        spans.append(("payload block", blocks[0], 4 * KiB))
    end = -(-len(data) // MiB) * MiB
    targets = sorted({0, MiB, log_off, md_off, bat_off, end, end + MiB, *blocks})
    return Base(name, data, spans, fields, bat_off, n_entries, bitmap_index, targets, log_off, parent)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """The three valid files, plus the directory the mutated copies go to (next to the parent, so the
    differencing disk's relative parent path still resolves)."""
    root = tmp_path_factory.mktemp("fuzz")
    ours, parent, child, qemu = (str(root / n) for n in ("ours.vhdx", "parent.vhdx", "child.vhdx", "qemu.vhdx"))
    with create_vhdx(ours, 8 * MiB, block_size=MiB) as d:
        d.write(0, b"\x11" * MiB)
        d.write(3 * MiB + 512, b"\x22" * 5000)
        d.write(7 * MiB, bytes(range(256)) * 4096)
    with create_vhdx(parent, 8 * MiB, block_size=MiB) as d:
        d.write(0, b"\xaa" * (3 * MiB))
        d.write(6 * MiB, b"\xab" * MiB)
    with create_vhdx(child, 0, parent=parent, block_size=MiB) as d:
        d.write(MiB + 1024, b"\xcc" * 2048)               # partially present: sector bitmap in use
        d.write(4 * MiB, b"\xcd" * MiB)                   # fully present
    run("qemu-img", "create", "-q", "-f", "vhdx", "-o", "block_size=1M,subformat=dynamic", qemu, 8 * MiB)
    run("qemu-io", "-f", "vhdx", "-c", "write -P 0x5a 0 1M", "-c", "write -P 0x6b 5M 4k",
        "-c", "write -P 0x6c 7M 512", qemu)
    out = {}
    for name, path, par in (("ours", ours, None), ("child", child, parent), ("qemu", qemu, None)):
        with open(path, "rb") as f:
            out[name] = describe(name, f.read(), par)
    return root, out


# ------------------------------------------------------------------------------------------ mutations
KINDS = ("flip", "sflip", "field", "field", "hfield", "bat", "truncate", "extend", "arm_log")
HEADER_FIELDS = [(8, "<Q"), (16, "16s"), (32, "16s"), (48, "16s"), (64, "<H"), (66, "<H"), (68, "<I"), (72, "<Q")]
TOP = 0xFFFFFFFFFFF00000        # the largest FileOffsetMB (44 bits) as a byte offset
INTERESTING = [0, 1, 2, 3, 5, 6, 7, 8, 255, 511, 512, 513, 1023, 1024, 4095, 4096, 4097, 32768, 65535, 65536,
               MiB - 1, MiB, MiB + 1, 2 * MiB, 3 * MiB, 4 * MiB, 8 * MiB, 32 * MiB, 256 * MiB, 512 * MiB,
               (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32, 1 << 40, 64 << 40, (64 << 40) + 512,
               (1 << 63) - 1, 1 << 63, (1 << 64) - 1]


def interesting(sel: int, rnd: int, bits: int) -> int:
    mask = (1 << bits) - 1
    pick = sel % (len(INTERESTING) + 3)
    if pick < len(INTERESTING):
        return INTERESTING[pick] & mask
    if pick == len(INTERESTING):
        return rnd & mask
    return (rnd & mask) & ~0xFFF if bits > 12 else rnd & mask     # sector-aligned random


def fix_checksum(buf: bytearray, start: int, length: int) -> None:
    if start + length > len(buf) or length < 8:
        return
    region = bytearray(buf[start:start + length])
    region[4:8] = b"\0\0\0\0"
    struct.pack_into("<I", buf, start + 4, crc32c(bytes(region)))


def fix_log_checksum(buf: bytearray, start: int) -> None:
    if start + 12 > len(buf):
        return
    length = _u("<I", buf, start + 8)
    if 0 < length <= MiB and length % 4096 == 0:
        fix_checksum(buf, start, length)


def arm_log(buf: bytearray, base: Base, a: int, b: int, c: int) -> None:
    """A complete log entry (valid unless later mutations break it) and LogGuid set in both headers."""
    rng = random.Random(a ^ (b << 1) ^ (c << 2))
    pos = (a % 4) * 4096
    updates = []
    for _ in range(1 + b % 3):
        target = rng.choice(base.targets + [HEADERS[0], REGION_TABLES[0]]) + rng.randrange(0, 16) * 4096
        if rng.random() < 0.3:
            updates.append(ZeroUpdate(target, 4096 * rng.randrange(1, 257)))
        else:
            sector = bytearray(buf[target:target + 4096].ljust(4096, b"\0"))
            sector[rng.randrange(4096)] ^= 1 << rng.randrange(8)
            updates.append(DataUpdate(target, bytes(sector)))
    if c % 13 == 0:                               # a descriptor aimed at the top of the 64-bit range
        updates[0] = DataUpdate(TOP, bytes(4096)) if c % 2 else ZeroUpdate(TOP, 4096)
    end = len(buf) // MiB * MiB
    flushed = end if c % 5 else end + MiB
    last = flushed + (c % 3) * MiB if c % 13 != 1 else TOP
    blob = encode_entry(updates, sequence_number=1 + c % 1000, log_guid=LOG_GUID, tail=pos if c % 7 else 8192,
                        flushed_file_offset=flushed, last_file_offset=last)
    at = base.log_offset + pos
    if at + len(blob) <= len(buf):
        buf[at:at + len(blob)] = blob
    for h in HEADERS:
        if h + 4096 <= len(buf) and buf[h:h + 4] == b"head":
            buf[h + 48:h + 64] = LOG_GUID.bytes_le
            fix_checksum(buf, h, 4096)


def guid_value(sel: int, rnd: int, buf: bytearray, base: Base) -> bytes:
    choices = [uuid.UUID(int=0), LOG_GUID, BAT_GUID, METADATA_GUID, *KNOWN_ITEMS,
               uuid.UUID(int=rnd & ((1 << 128) - 1))]
    pick = sel % (len(choices) + 1)
    if pick == len(choices):                # the GUID of whatever entry sits at the start of the log
        at = base.log_offset + 32
        return bytes(buf[at:at + 16].ljust(16, b"\0"))
    return choices[pick].bytes_le


def mutate(base: Base, muts) -> bytearray:
    buf = bytearray(base.data)
    for kind, a, b, c in muts:
        if kind == "flip":
            if buf:
                at = a % min(len(buf), 4 * MiB)
                buf[at] ^= 1 + b % 255
        elif kind == "sflip":
            _, start, length = base.spans[a % len(base.spans)]
            at = start + b % length
            if at < len(buf):
                buf[at] ^= 1 << (c % 8)
        elif kind == "field":
            at, fmt, crc = base.fields[a % len(base.fields)]
            size = struct.calcsize(fmt)
            if at + size > len(buf):
                continue
            if fmt == "16s":
                value = guid_value(b, c, buf, base)
            elif fmt == "4s":
                value = [b"zero", b"desc", b"data", b"loge", b"\0\0\0\0"][b % 5]
            else:
                value = interesting(b, c, 8 * size)
            struct.pack_into(fmt, buf, at, value)
            if crc and crc[0] == "crc":
                fix_checksum(buf, crc[1], crc[2])
            elif crc and crc[0] == "log":
                fix_log_checksum(buf, crc[1])
        elif kind == "hfield":                   # the same field in both header copies, CRC fixed
            off, fmt = HEADER_FIELDS[a % len(HEADER_FIELDS)]
            value = guid_value(b, c, buf, base) if fmt == "16s" else interesting(b, c, 8 * struct.calcsize(fmt))
            for h in HEADERS:
                if h + 4096 <= len(buf):
                    struct.pack_into(fmt, buf, h + off, value)
                    fix_checksum(buf, h, 4096)
        elif kind == "bat":
            if base.bitmap_index is not None and a % 3 == 0:
                index = base.bitmap_index
            else:
                index = a % base.bat_entries
            offsets = [TOP, 1 << 63, TOP - 31 * MiB] + base.targets + [(c % 64) * MiB, (c & 0xFFFFFFFFFFF) << 20]
            value = (offsets[(b >> 3) % len(offsets)] & ~0xFFFFF & 0xFFFFFFFFFFFFFFFF) | (b % 8)
            if c % 11 == 0:
                value |= 1 << (3 + c % 17)      # a reserved bit
            at = base.bat_offset + 8 * index
            if at + 8 <= len(buf):
                struct.pack_into("<Q", buf, at, value)
        elif kind == "truncate":
            n = len(buf) + 1
            cut = a % n if b % 2 else (a % (n // 4096 + 1)) * 4096
            del buf[cut:]
        elif kind == "extend":
            buf += bytes((1 + a % 8) * (MiB // 2 if b % 2 else MiB))
        elif kind == "arm_log":
            arm_log(buf, base, a, b, c)
    return buf


# ------------------------------------------------------------------------------------------ exercising
class Hang(BaseException):
    pass


def _on_alarm(signum, frame):
    raise Hang()


@contextmanager
def time_limit(what: str):
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(TIME_LIMIT)
    try:
        yield
    except Hang:
        pytest.fail(f"no answer within {TIME_LIMIT} s: {what}")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def sha(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def survey(d: VhdxDisk):
    """Read the disk (bounded), check the extents against what was read; returns what was read."""
    size = d.size
    if size <= READ_LIMIT:
        windows = [(0, size)]
    else:
        windows = [(0, 4 * MiB), (size - 4 * MiB, 4 * MiB)]
    content = {off: d.read(off, n) for off, n in windows}
    pos = 0
    for ext in itertools.islice(d.extents(), 100_000):
        assert ext.offset == pos and ext.length > 0, f"extent {ext} does not continue at {pos}"
        pos = ext.end
        if ext.kind is ExtentKind.ZERO:
            for off, n in windows:
                lo, hi = max(off, ext.offset), min(off + n, ext.end)
                if lo < hi:
                    assert content[off][lo - off:hi - off].count(0) == hi - lo, f"ZERO extent {ext} reads non-zero"
    else:
        assert pos == size, f"extents end at {pos}, disk is {size} bytes"
    json.dumps(d.info())
    return content


def exercise(root, base: Base, muts) -> None:
    what = f"{base.name} with {muts!r}"
    buf = mutate(base, muts)
    ro_path, rw_path = str(root / f"fz-{base.name}-ro.vhdx"), str(root / f"fz-{base.name}-rw.vhdx")
    for p in (ro_path, rw_path):
        with open(p, "wb") as f:
            f.write(buf)
    parent_sha = sha(base.parent) if base.parent else None
    before = hashlib.sha256(buf).hexdigest()
    with time_limit(what):
        ro_content = ro_error = None
        try:
            d = VhdxDisk.open(ro_path, read_only=True)
        except ReplicatorError as e:
            ro_error = e
        else:
            try:
                ro_content = survey(d)
            except ReplicatorError:
                pass
            finally:
                d.close()
        assert sha(ro_path) == before, f"read-only use changed the file: {what}"

        problems = check_vhdx(ro_path)
        assert isinstance(problems, list) and all(isinstance(p, str) for p in problems)
        if ro_error is not None:
            assert problems, f"check found nothing but open failed with {ro_error!r}: {what}"
        assert sha(ro_path) == before, f"check_vhdx changed the file: {what}"

        try:
            d = VhdxDisk.open(rw_path, read_only=False)
        except ReplicatorError:
            d = None            # (a read-write open may refuse more, e.g. a SequenceNumber that cannot grow)
        if d is not None:
            assert ro_error is None or isinstance(ro_error, LogReplayRequired), \
                f"read-only open failed with {ro_error!r} but read-write open worked: {what}"
            written = None
            try:
                rw_content = survey(d)
                if ro_content is not None:
                    assert rw_content == ro_content, f"read-write open reads other bytes: {what}"
                pattern = bytes([0x5c]) * 4096
                at = min(d.size - 4096, 2 * MiB + 512) // 512 * 512
                d.write(at, pattern)
                assert d.read(at, 4096) == pattern, f"write not read back: {what}"
                written = at
                d.flush()
            except ReplicatorError:
                written = None
            finally:
                try:
                    d.close()
                except ReplicatorError:
                    written = None
            if written is not None:
                try:
                    with VhdxDisk.open(rw_path, read_only=True) as again:
                        assert again.read(written, 4096) == pattern
                except ReplicatorError as e:
                    pytest.fail(f"file accepted, written and closed no longer opens: {e!r}: {what}")
    if parent_sha is not None:
        assert sha(base.parent) == parent_sha, f"the parent changed: {what}"


# ------------------------------------------------------------------------------------------ tests
def test_unmutated_bases_pass_every_check(bases):
    root, imgs = bases
    for base in imgs.values():
        exercise(root, base, [])
        assert check_vhdx(str(root / f"{base.name}.vhdx")) == []
    assert len(imgs["child"].spans) > len(imgs["ours"].spans)      # the sector bitmap was found


def test_mutations_reach_deep_validation(bases):
    """Sanity of the harness: CRC-fixed field rewrites get past the checksum to the field checks."""
    root, imgs = bases
    base = imgs["ours"]
    h = HEADERS[0] if _u("<Q", base.data, HEADERS[0] + 8) > _u("<Q", base.data, HEADERS[1] + 8) else HEADERS[1]
    field = next(i for i, (at, fmt, _) in enumerate(base.fields) if at == h + 66)       # Version
    buf = mutate(base, [("field", field, INTERESTING.index(2), 0)])
    path = str(root / "deep.vhdx")
    with open(path, "wb") as f:
        f.write(buf)
    with pytest.raises(ReplicatorError, match="Version is 2"):
        VhdxDisk.open(path)
    buf = mutate(base, [("arm_log", 0, 0, 2)])
    with open(path, "wb") as f:
        f.write(buf)
    with pytest.raises(LogReplayRequired):
        VhdxDisk.open(path)
    VhdxDisk.open(path, read_only=False).close()                      # replays
    VhdxDisk.open(path).close()


mutation = st.tuples(st.sampled_from(KINDS), st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 64) - 1),
                     st.integers(0, (1 << 64) - 1))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ours", "child", "qemu"])
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(muts=st.lists(mutation, min_size=1, max_size=4))
def test_fuzzed_vhdx_fails_cleanly(bases, name, muts):
    root, imgs = bases
    exercise(root, imgs[name], muts)


# Mutation lists that once broke the engine, replayed on every run (field/kind indexes as in mutate()).
REGRESSIONS = [
    # BAT entry at FileOffsetMB 2^44-1: offset + 1 MiB wraps to 0 in uint64, passed validation, then the
    # read raised OverflowError and check_vhdx reported nothing
    [("bat", 1, 0 << 3 | 6, 1)],
    # 31 MiB below the top (no wrap with 1 MiB blocks): refused as outside the file, like the top must be
    [("bat", 2, 2 << 3 | 6, 1)],
    # a staged log whose data descriptor targets 2^64 - 1 MiB (valid checksum): OverflowError on replay
    [("arm_log", 0, 0, 13)],
    # ... whose zero descriptor does
    [("arm_log", 0, 0, 26)],
    # ... whose LastFileOffset is 2^64 - 1 MiB
    [("arm_log", 0, 0, 1)],
    # LogGuid set and LogLength 0 in both headers: ZeroDivisionError in the log scan
    [("arm_log", 0, 0, 2), ("hfield", 6, 0, 0)],
    # LogOffset 2^63 in both headers: the first log write raised OverflowError in pwrite
    [("hfield", 7, 4286407, 0)],
]


@pytest.mark.parametrize("name", ["ours", "child", "qemu"])
@pytest.mark.parametrize("case", range(len(REGRESSIONS)))
def test_fuzz_regressions(bases, name, case):
    root, imgs = bases
    exercise(root, imgs[name], REGRESSIONS[case])


def random_mutations(rng: random.Random):
    return [(rng.choice(KINDS), rng.getrandbits(64), rng.getrandbits(64), rng.getrandbits(64))
            for _ in range(rng.randint(1, 4))]


@pytest.mark.parametrize("name", ["ours", "child", "qemu"])
def test_fixed_seed_batch(bases, name):
    """Reproducible in CI: the same 60 random mutation lists per base on every run."""
    root, imgs = bases
    rng = random.Random(f"vhdx-fuzz-{name}")
    for _ in range(60):
        exercise(root, imgs[name], random_mutations(rng))
