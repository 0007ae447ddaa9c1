"""The block allocation table (MS-VHDX §2.5): entry states, interleaving, and validation.

The BAT is held as a numpy uint64 array so that validation and extent scans over millions of entries
stay vectorized. Payload block b lives at BAT index b + b // chunk_ratio; the sector bitmap entry of
chunk c follows that chunk's payload entries, at index c * (chunk_ratio + 1) + chunk_ratio.
"""
from __future__ import annotations

import enum

import numpy as np

from ..errors import FormatError
from .structures import MiB

STATE_MASK = 0x7
RESERVED_MASK = 0xFFFF8          # bits 3..19
OFFSET_MASK = ~0xFFFFF & 0xFFFFFFFFFFFFFFFF


class PayloadState(enum.IntEnum):
    NOT_PRESENT = 0
    UNDEFINED = 1
    ZERO = 2
    UNMAPPED = 3
    UNMAPPED_LEGACY = 5   # written by qemu before 2.1 (spec draft 0.95) for UNMAPPED
    FULLY_PRESENT = 6
    PARTIALLY_PRESENT = 7


class BitmapState(enum.IntEnum):
    NOT_PRESENT = 0
    PRESENT = 6


PRESENT_STATES = (PayloadState.FULLY_PRESENT, PayloadState.PARTIALLY_PRESENT)


def make_entry(state: int, file_offset: int) -> int:
    return (file_offset & OFFSET_MASK) | int(state)


class BatLayout:
    """Index arithmetic between payload blocks, chunks and BAT entries."""

    def __init__(self, chunk_ratio: int, n_payload: int, n_entries: int):
        self.chunk_ratio = chunk_ratio
        self.n_payload = n_payload
        self.n_entries = n_entries

    def payload_index(self, block: int) -> int:
        return block + block // self.chunk_ratio

    def bitmap_index(self, chunk: int) -> int:
        return chunk * (self.chunk_ratio + 1) + self.chunk_ratio

    def is_bitmap_index(self, index):
        return (index + 1) % (self.chunk_ratio + 1) == 0

    def payload_indices(self) -> np.ndarray:
        blocks = np.arange(self.n_payload, dtype=np.int64)
        return blocks + blocks // self.chunk_ratio


def validate_bat(bat: np.ndarray, layout: BatLayout, *, block_size: int, has_parent: bool, file_size: int,
                 reserved: list[tuple[int, int, str]], bat_offset: int, path: str | None) -> None:
    """Reject entries that would make reads wrong or writes destructive (§2.5.1)."""
    idx = np.arange(len(bat), dtype=np.int64)
    is_sb = layout.is_bitmap_index(idx)
    states = (bat & np.uint64(STATE_MASK)).astype(np.int64)
    offsets = (bat & np.uint64(OFFSET_MASK)).astype(np.uint64)

    def fail(i: int, problem: str) -> None:
        kind = "sector bitmap" if is_sb[i] else f"payload block {int(i - i // (layout.chunk_ratio + 1))}"
        raise FormatError(f"BAT entry {i} ({kind})", bat_offset + 8 * int(i), problem, path)

    payload_ok = np.isin(states, [0, 1, 2, 3, 5, 6] + ([7] if has_parent else []))
    sb_ok = np.isin(states, [0] + ([6] if has_parent else []))
    bad = np.flatnonzero(np.where(is_sb, ~sb_ok, ~payload_ok))
    if len(bad):
        i = int(bad[0])
        fail(i, f"state {int(states[i])} is not valid for a "
                f"{'differencing' if has_parent else 'fixed or dynamic'} disk")

    present = np.where(is_sb, states == 6, (states == 6) | (states == 7))
    sizes = np.where(is_sb, MiB, block_size).astype(np.uint64)
    p_idx = np.flatnonzero(present)
    if not len(p_idx):
        return
    p_off, p_len = offsets[p_idx], sizes[p_idx]
    low = np.flatnonzero(p_off < np.uint64(MiB))
    if len(low):
        fail(int(p_idx[low[0]]), f"FileOffsetMB {int(p_off[low[0]]) // MiB} points into the header section")
    fs = np.uint64(file_size)
    beyond = np.flatnonzero((p_off > fs) | (p_len > fs - np.minimum(p_off, fs)))   # no uint64 wrap-around
    if len(beyond):
        i = int(beyond[0])
        fail(int(p_idx[i]), f"block [{int(p_off[i])}, {int(p_off[i]) + int(p_len[i])}) lies outside the file "
                            f"of {file_size} bytes")
    for start, length, name in reserved:
        hit = np.flatnonzero((p_off < np.uint64(start + length)) & (np.uint64(start) < p_off + p_len))
        if len(hit):
            fail(int(p_idx[hit[0]]), f"block at {int(p_off[hit[0]])} overlaps the {name} "
                                     f"[{start}, {start + length})")
    order = np.argsort(p_off, kind="stable")
    s_off, s_len = p_off[order], p_len[order]
    clash = np.flatnonzero(s_off[1:] < s_off[:-1] + s_len[:-1])
    if len(clash):
        a, b = int(p_idx[order[clash[0]]]), int(p_idx[order[clash[0] + 1]])
        fail(b, f"block at {int(offsets[b])} overlaps the block of BAT entry {a}")

    if has_parent:
        partial = np.flatnonzero(states == 7)
        if len(partial):
            chunks = partial // (layout.chunk_ratio + 1)
            sb_states = states[chunks * (layout.chunk_ratio + 1) + layout.chunk_ratio]
            missing = np.flatnonzero(sb_states != 6)
            if len(missing):
                fail(int(partial[missing[0]]), "PARTIALLY_PRESENT but its chunk's sector bitmap block is not "
                                               "present")
