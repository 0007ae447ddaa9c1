"""Known-answer self-test run at import: a miscompiled or mis-dispatched native build must not hash disks
(nor serve a guest's writes: one NBD write through the native write path, into a memory file).

The constants were checked against the `xxhash` PyPI package (xxh3_128_hexdigest) and `xxhsum -H2`;
CRC-32C of "123456789" is the standard check value. It costs a few tens of microseconds.
"""
from __future__ import annotations

from replicator.errors import KernelSelfTestError

# Quadratic residues mod 251: no period matching a stripe (64), block (1 KiB) or SIMD lane width.
PATTERN = bytes((i * i + 3 * i) % 251 for i in range(1024))

CRC_CHECK = 0xE3069283                      # crc32c(b"123456789")
CRC_PATTERN = 0xC34E52E9                    # crc32c(PATTERN): long enough for the 3-way hardware loop
XXH_PATTERN = "3a2693b114177dc04ba17d07dc7aa376"
BYTE_SUM_PATTERN = None   # set below from a plain Python sum: the definition needs no magic number      # xxh3_128(PATTERN): the SIMD long-input loop
XXH_PATTERN_100 = "2a5983a491da4019a615c5f9c9b5e211"  # xxh3_128(PATTERN[:100]): a short-input path


def _cases(k):
    """(kernel, compute, expected) triples; compute is called lazily so one failure names its kernel."""
    zeros = bytes(300) + b"\x01" + bytes(723) + bytes(1023) + b"\x02"
    return [
        ("crc32c", lambda: k.crc32c(b"123456789"), CRC_CHECK),
        ("crc32c", lambda: k.crc32c(b"56789", k.crc32c(b"1234")), CRC_CHECK),
        ("crc32c", lambda: k.crc32c(PATTERN), CRC_PATTERN),
        ("xxh3_128", lambda: k.xxh3_128(PATTERN).hex(), XXH_PATTERN),
        ("xxh3_128", lambda: k.xxh3_128(PATTERN[:100]).hex(), XXH_PATTERN_100),
        ("xxh3_128_blocks",
         lambda: [k.digest_bytes(r).hex() for r in k.xxh3_128_blocks(PATTERN + PATTERN[:100], 1024)],
         [XXH_PATTERN, XXH_PATTERN_100]),
        ("Xxh3Hasher", lambda: _streamed(k).hex(), XXH_PATTERN),
        ("zero_blocks", lambda: k.zero_blocks(zeros, 256).tolist(),
         [True, False, True, True, True, True, True, False]),
        ("byte_sum", lambda: k.byte_sum(PATTERN[:1000] + b"\xff" * 77), BYTE_SUM_PATTERN),
    ] + ([("NbdExport", lambda: _nbd_write(k), NBD_WRITE)] if getattr(k, "NbdExport", None) else [])


# One NBD write of PATTERN[:100] at 4096 (cookie 0x1122334455667788) through the export's native write path:
# (end of the request, served, errno, bytes in the file, bytes staged, entry's offset, length, operation and
# data checksum, whether the entry's own checksum holds, the reply)
NBD_WRITE = (128, 1, 0, PATTERN[:100], PATTERN[:100], 4096, 100, 1, ~sum(PATTERN[:100]) & 0xFFFFFFFF, True,
             bytes.fromhex("67446698000000001122334455667788"))


def _nbd_write(k) -> tuple:
    """The write into a memory file whose block 0 sits at 1 MiB; the entry is read back field by field."""
    import os
    import struct

    import numpy as np
    fd = os.memfd_create("replicator-selftest")
    try:
        os.ftruncate(fd, 2 << 20)
        w = k.NbdExport()
        w.bind_disk(fd, 1 << 20, np.array([(1 << 20) | 6], dtype=np.uint64), 1 << 20, 256, 4096)
        w.bind_regions(bytearray(b"\x01"), 1 << 20)
        stage, entries = bytearray(4096), bytearray(32)
        w.bind_log(stage, entries, 1)
        request = struct.pack(">IHHQQI", 0x25609513, 0, 1, 0x1122334455667788, 4096, 100) + PATTERN[:100]
        end, served, _, log_len, _, reply, err = w.serve(request, 0, 0, 0)
        landed = os.pread(fd, 100, (1 << 20) + 4096)
    finally:
        os.close(fd)
    offset, stored, length, _, op, data_ck = struct.unpack_from("<QIIIBI", entries)
    own = ~(sum(entries) - sum(entries[8:12])) & 0xFFFFFFFF
    return (end, served, err, landed, bytes(stage[:log_len]), offset, length, op, data_ck, own == stored, reply)


def _streamed(k) -> bytes:
    hasher = k.Xxh3Hasher()
    hasher.update(PATTERN[:300])
    hasher.update(PATTERN[300:])
    return hasher.digest()


def run(kernels, label: str = "native") -> None:
    """Raise KernelSelfTestError naming the first kernel whose known answer is wrong."""
    for name, compute, expected in _cases(kernels):
        got = compute()
        if got != expected:
            raise KernelSelfTestError(
                f"{label} kernel {name} failed its known-answer self-test: expected {_show(expected)}, "
                f"got {_show(got)} (bad build or wrong CPU dispatch; set REPLICATOR_KERNELS=python to bypass)")


def _show(value) -> str:
    return f"0x{value:08X}" if isinstance(value, int) else repr(value)


BYTE_SUM_PATTERN = sum(PATTERN[:1000]) + 255 * 77
