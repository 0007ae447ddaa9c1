"""MS-HRL reader and writer: the §3 worked example, round trips, coalescing, corruption, chains, apply."""
from __future__ import annotations

import os
import random
import struct
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicator.errors import FormatError
from replicator.hrl import ChainError, HrlReader, HrlWriter, LogNotSealed, apply_chain, coalesce, open_chain
from replicator.hrl.format import (HEADER_SIZE, LogHeader, MetadataEntry, checksum, pack_metadata,
                                   parse_metadata)
from replicator.vhdx import VhdxDisk, create_vhdx

from ..externals import qemu_compare

MiB = 1 << 20

EXAMPLE_ENTRIES = [  # (MetaDataId, DataLength, ByteOffset, TimeStamp, Checksum) from MS-HRL section 3
    (1, 4096, 3626348544, 539842381, 4294966608), (2, 4096, 8026886144, 539842381, 4294966558), (3, 4096, 3699798016, 539842381, 4294966571),
    (4, 4096, 3700805632, 539842381, 4294966460), (5, 4096, 4111884288, 539842381, 4294966674), (6, 2048, 139466752, 539842381, 4294966933),
    (7, 2048, 147937280, 539842381, 4294966740), (8, 4096, 7792644096, 539842381, 4294966626), (9, 4096, 3699830784, 539842381, 4294966443),
    (10, 4096, 3709980672, 539842381, 4294966575), (11, 4096, 3722543104, 539842381, 4294966463), (12, 4096, 3626344448, 539842381, 4294966624),
    (13, 4096, 7792652288, 539842381, 4294966594), (14, 4096, 3699900416, 539842381, 4294966681), (15, 4096, 3734429696, 539842381, 4294966441),
    (16, 12288, 3699957760, 539842381, 4294966425), (17, 4096, 3737313280, 539842381, 4294966397), (18, 4096, 3743948800, 539842381, 4294966742),
    (19, 512, 138656768, 539842381, 4294966788), (20, 512, 139058688, 539842381, 4294966748), (21, 8192, 3757490176, 539842381, 4294966360),
    (22, 4096, 3760070656, 539842381, 4294966751), (23, 1024, 135266304, 539842382, 4294967024), (24, 8192, 3771551744, 539842382, 4294966511),
    (25, 4096, 3771564032, 539842382, 4294966479), (26, 512, 138656768, 539842382, 4294966787), (27, 512, 139058688, 539842382, 4294966747),
    (28, 16384, 3774267392, 539842382, 4294966326), (29, 4096, 3774308352, 539842382, 4294966469), (30, 4096, 3774361600, 539842382, 4294966516),
    (31, 8192, 3626414080, 539842382, 4294966590), (32, 4096, 3777036288, 539842382, 4294966778), (33, 8192, 3792945152, 539842382, 4294966583),
    (34, 4096, 3626352640, 539842382, 4294966591), (35, 8192, 3793145856, 539842382, 4294966564), (36, 4096, 3793178624, 539842382, 4294966707),
    (37, 512, 3676929536, 539842382, 4294966664), (38, 4096, 3793252352, 539842382, 4294966674), (39, 4096, 3794485248, 539842382, 4294966703),
    (40, 31232, 3673733120, 539842382, 4294966280), (41, 4096, 3626418176, 539842382, 4294966590), (42, 31232, 3673764352, 539842382, 4294966413),
    (43, 4096, 3626352640, 539842382, 4294966591), (44, 4096, 3626418176, 539842382, 4294966590), (45, 4096, 3694907392, 539842382, 4294966549),
    (46, 8192, 3700453376, 539842382, 4294966544), (47, 4096, 3626352640, 539842382, 4294966591), (48, 4096, 3704586240, 539842382, 4294966481),
    (49, 8192, 3737305088, 539842382, 4294966412), (50, 4096, 3793489920, 539842382, 4294966766), (51, 4096, 10188185600, 539842382, 4294966776),
    (52, 4096, 3628867584, 539842382, 4294966712), (53, 4096, 3626414080, 539842382, 4294966606), (54, 4096, 3626340352, 539842382, 4294966639),
    (55, 4096, 3628871680, 539842382, 4294966696), (56, 8192, 3626348544, 539842382, 4294966591), (57, 4096, 3626344448, 539842382, 4294966623),
    (58, 4096, 3626340352, 539842382, 4294966639),
]


def test_worked_example_metadata_and_entry_checksums_follow_from_the_printed_fields():
    """§3: metadata #2 (PreviousMetadataLocation 324096, 58 entries) has checksum 4294966991, and every entry
    checksum follows from its fields with DataChecksum 0. (The example's file-header checksum, 4294959739,
    does not follow from its printed fields under any layout, so it is not used as a vector.)"""
    entries = [MetadataEntry(off, length, ts, 1, 0) for _, length, off, ts, _ in EXAMPLE_ENTRIES]
    block = pack_metadata(324096, b"".join(e.pack() for e in entries), len(entries), 4096)
    assert struct.unpack_from("<I", block, 12)[0] == 4294966991
    assert pack_metadata(0, b"", 0, 4096)[12:16] == struct.pack("<I", 4294967295)     # metadata #1
    for (ident, *_rest, expected), e in zip(EXAMPLE_ENTRIES, entries):
        assert struct.unpack_from("<I", e.pack(), 8)[0] == expected, f"entry {ident}"
    parsed = parse_metadata(block, 328192, 4096)
    assert parsed.entries == tuple(entries)


def _example_log(path):
    """The §3 log rebuilt: header, empty metadata #1 at 4096, 320000 bytes of data, metadata #2 at 328192."""
    entries = [MetadataEntry(off, length, ts, 1, 0) for _, length, off, ts, _ in EXAMPLE_ENTRIES]
    header = LogHeader(timestamp=539842380, creator_application=b"ct\0\0", creator_version=0xA0000,
                       original_size=0, current_size=332288, eol_location=332288, metadata_size=4096,
                       unique_id=uuid.UUID("572fc7ff-1f03-49ab-b3c5-30a665b8e20c"),
                       previous_unique_id=uuid.UUID("a8ae4b46-f7ad-4402-87aa-5b33e9f89c77"),
                       last_modified_timestamp=539842384, total_metadata_entries=58,
                       vhd2_data_write_guid=uuid.UUID("b9be5c57-f8be-5503-98bb-6c44faf9ac87"))
    with open(path, "wb") as f:
        f.write(header.pack())
        f.write(pack_metadata(0, b"", 0, 4096))
        f.write(bytes(sum(e.data_length for e in entries)))
        f.write(pack_metadata(324096, b"".join(e.pack() for e in entries), len(entries), 4096))
    return entries


def test_worked_example_traverses_as_the_spec_describes(tmp_path):
    path = str(tmp_path / "example.hrl")
    entries = _example_log(path)
    assert os.path.getsize(path) == 332288
    with HrlReader(path) as r:
        assert [b.location for b in r.blocks] == [4096, 328192]
        assert len(r.writes) == 58
        assert r.writes[0].data_location == 8192
        assert r.writes[-1].data_location + r.writes[-1].length == 328192
        assert [(w.offset, w.length) for w in r.writes] == [(e.byte_offset, e.data_length) for e in entries]
        assert r.header.vhd2_data_write_guid == uuid.UUID("b9be5c57-f8be-5503-98bb-6c44faf9ac87")
        exts = r.extents()
    # entries 1 and 54/58 (offset 3626340352 twice, 3626348544 ...) overlap: the coalesced map covers the union
    covered = set()
    for e in entries:
        covered.update(range(e.byte_offset // 512, (e.byte_offset + e.data_length) // 512))
    assert sum(x.length for x in exts) // 512 == len(covered)


def _shadow_apply(buf: bytearray, writes):
    for off, data in writes:
        buf[off:off + len(data)] = data


writes_strategy = st.lists(st.tuples(st.integers(0, 200) .map(lambda s: s * 512),
                                     st.integers(1, 24).map(lambda n: n * 512), st.integers(0, 255)),
                           max_size=300)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=writes_strategy, md_size=st.sampled_from([4096, 1024, 512 + 32]))
def test_roundtrip_and_coalesce_equal_naive_replay(tmp_path, ops, md_size):
    path = str(tmp_path / f"rt-{random.getrandbits(40)}.hrl")
    rng = random.Random(len(ops))
    writes = [(off, bytes([b]) * 7 + rng.randbytes(n - 7)) for off, n, b in ops]
    w = HrlWriter(path, metadata_size=md_size)
    for off, data in writes:
        w.append(off, data)
    w.seal()
    size = 300 * 512
    naive, coalesced = bytearray(size), bytearray(size)
    _shadow_apply(naive, writes)
    with HrlReader(path, disk_size=size) as r:
        assert [(x.offset, r.read_data(x)) for x in r.writes] == writes
        assert r.header.total_metadata_entries == len(writes)
        for e in r.extents():
            coalesced[e.offset:e.offset + e.length] = r.read_raw(e.data_location, e.length)
        exts = r.extents()
    assert coalesced == naive
    assert all(a.offset + a.length <= b.offset for a, b in zip(exts, exts[1:]))
    os.unlink(path)


def test_coalesce_last_write_wins_and_merges_contiguous_pieces():
    from replicator.hrl.reader import LogWrite
    ws = [LogWrite(0, 100, 1000, 0, 0), LogWrite(50, 100, 2000, 0, 0), LogWrite(150, 50, 2100, 0, 0)]
    got = [(e.offset, e.length, e.data_location) for e in coalesce(ws)]
    assert got == [(0, 50, 1000), (50, 150, 2000)]     # the second and third continue each other in the log


def _small_log(path, n=5, **kw):
    w = HrlWriter(path, **kw)
    for i in range(n):
        w.append(i * 4096, bytes([i + 1]) * 4096)
    return w


def test_unsealed_log_is_reported_as_not_closed_cleanly(tmp_path):
    path = str(tmp_path / "open.hrl")
    w = _small_log(path)
    w.commit(durable=True)
    with pytest.raises(LogNotSealed, match="not closed cleanly"):
        HrlReader(path)
    w.close()


@pytest.mark.parametrize("where,structure", [(3, "HRL header"), (HEADER_SIZE + 4096 + 100, "HRL data entry"),
                                             ("md", "HRL metadata header"), ("entry", "HRL metadata entry 2")])
def test_corruption_is_named_with_its_offset(tmp_path, where, structure):
    path = str(tmp_path / "c.hrl")
    _small_log(path).seal()
    with HrlReader(path) as r:
        md = r.blocks[-1].location
    at = {"md": md + 8, "entry": md + 32 + 32 + 12}.get(where, where)
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x40]))
    with pytest.raises(FormatError) as info:
        with HrlReader(path) as r:
            r.verify_data()
    assert info.value.structure == structure
    assert str(info.value.offset) in str(info.value)


def test_truncated_log_and_entries_beyond_the_disk(tmp_path):
    path = str(tmp_path / "t.hrl")
    _small_log(path).seal()
    with pytest.raises(FormatError, match="beyond the disk size"):
        HrlReader(path, disk_size=3 * 4096)
    size = os.path.getsize(path)
    os.truncate(path, size - 100)
    with pytest.raises(FormatError, match="truncated"):
        HrlReader(path)


def test_metadata_pointing_outside_the_log(tmp_path):
    path = str(tmp_path / "p.hrl")
    _small_log(path).seal()
    with HrlReader(path) as r:
        md = r.blocks[-1].location
    raw = bytearray(open(path, "rb").read())
    struct.pack_into("<Q", raw, md, md + 10 * 4096)            # previous metadata before the file start
    struct.pack_into("<I", raw, md + 12, checksum(raw[md:md + 32], 12))
    open(path, "wb").write(raw)
    with pytest.raises(FormatError, match="PreviousMetadataLocation"):
        HrlReader(path)


def test_chain_links_and_apply_to_vhdx_matches_shadow(tmp_path):
    size = 8 * MiB
    disk_path, shadow_path = str(tmp_path / "d.vhdx"), str(tmp_path / "shadow.raw")
    shadow = bytearray(size)
    rng = random.Random(5)
    logs, prev = [], uuid.UUID(int=0)
    for k in range(3):
        path = str(tmp_path / f"{k}.hrl")
        w = HrlWriter(path, previous_unique_id=prev)
        for _ in range(40):
            off, n = rng.randrange(0, size - 70000), rng.randrange(1, 70000)
            data = rng.randbytes(n)
            w.append(off, data)
            shadow[off:off + n] = data
        prev = w.seal().unique_id
        logs.append(path)
    create_vhdx(disk_path, size, block_size=MiB).close()
    with pytest.raises(ChainError, match="missing"):
        open_chain([logs[0], logs[2]])
    before = open(disk_path, "rb").read()
    with pytest.raises(ChainError):
        with VhdxDisk.open(disk_path, read_only=False) as d:
            apply_chain(d, [logs[0], logs[2]])
    assert open(disk_path, "rb").read() == before, "a broken chain must not be partly applied"
    with VhdxDisk.open(disk_path, read_only=False) as d:
        stats = apply_chain(d, logs)
    assert stats.logs == 3 and stats.writes == 120 and stats.applied_bytes <= stats.log_data_bytes
    open(shadow_path, "wb").write(shadow)
    assert qemu_compare(disk_path, shadow_path).returncode == 0


def test_cli_dump_verify_apply(tmp_path, capsys):
    from replicator.cli import main
    path = str(tmp_path / "x.hrl")
    _small_log(path).seal()
    assert main(["hrl", "dump", path, "--extents"]) == 0
    assert "eol_location" in capsys.readouterr().out
    assert main(["hrl", "verify", path]) == 0
    disk = str(tmp_path / "x.vhdx")
    create_vhdx(disk, MiB * 4, block_size=MiB).close()
    assert main(["hrl", "apply", disk, path]) == 0
    with VhdxDisk.open(disk) as d:
        assert d.read(4096, 4096) == b"\x02" * 4096
    with open(path, "r+b") as f:
        f.seek(HEADER_SIZE + 4096 + 5)
        f.write(b"\xff")
    assert main(["hrl", "verify", path]) == 3
    assert "DataChecksum" in capsys.readouterr().err
