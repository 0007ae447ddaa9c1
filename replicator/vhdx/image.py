"""Opening a VHDX file: headers, region table, metadata, log replay, BAT and parent (MS-VHDX §2).

`VhdxDisk.open` leaves a validated, replayed image whose metadata lives in memory; reads and writes are
in `io_path.py` (mixed in), so this module is only about getting to a trustworthy state.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

import numpy as np

from ..disk.base import BlockDevice
from ..disk.locks import lock_image
from ..errors import FormatError, LogReplayRequired, ParentError, UnsupportedFeature
from . import structures as S
from .bat import BatLayout, PayloadState, validate_bat
from .fileio import FileIO
from .io_path import VhdxIOMixin
from .log import LogWriter, ReplayOverlay, plan_replay, replay
from .parent import check_linkage, resolve_parent


@dataclass(frozen=True)
class Geometry:
    block_size: int
    logical_sector_size: int
    physical_sector_size: int
    disk_size: int
    leave_block_allocated: bool
    has_parent: bool


class VhdxDisk(VhdxIOMixin, BlockDevice):
    format_name = "vhdx"

    def __init__(self):
        raise TypeError("use VhdxDisk.open() or replicator.vhdx.create_vhdx()")

    # ------------------------------------------------------------------ open
    @classmethod
    def open(cls, path: str, read_only: bool = True, *, io_factory=FileIO, _depth: int = 0,
             _chain_lock: bool = False, _children: tuple = ()) -> "VhdxDisk":
        """A read-write open locks the file as QEMU's writers do (in FileIO) and its parents as QEMU locks
        backing files (`_chain_lock`: read, and let nobody write). A read-only open locks nothing."""
        self = object.__new__(cls)
        self.path = path
        self.read_only = read_only
        self.io = io_factory(path, not read_only)
        self.parent = None
        self._chain_lock = _chain_lock or not read_only
        self._chain_files = _children
        try:
            st = os.fstat(self.io.fd)
            self._chain_files = _children + ((st.st_dev, st.st_ino),)    # to refuse a chain that loops
            if read_only and _chain_lock:
                lock_image(self.io.fd, path, write=False)
            self._load(io_factory, _depth)
        except BaseException:
            self._close_files()
            raise
        return self

    def _load(self, io_factory, depth: int) -> None:
        io = self.io
        self.file_size = io.size()
        self.creator = S.parse_file_identifier(io.pread(S.HEADER_SECTION_SIZE // 16, 0), self.path)
        self.header, self.header_slot = self._read_headers()
        S.validate_header(self.header, S.HEADER_OFFSETS[self.header_slot], self.path)
        if not self.read_only and self.header.sequence_number > S.MAX_SEQUENCE_FOR_WRITING:
            raise FormatError("header", S.HEADER_OFFSETS[self.header_slot],
                              f"SequenceNumber {self.header.sequence_number} is too close to 2^64 to be "
                              "incremented safely; the file can only be opened read-only", self.path)
        self._session_guids_written = False
        self._data_guid_changed = False
        active = self._plan_replay() if self.header.log_guid != S.ZERO_GUID else None
        if active:
            self.io = ReplayOverlay(io, active)     # validate the file as it will be after the replay
            self.file_size = self.io.size()
        try:
            self.regions = self._read_region_table()
            self._read_metadata()
            self._read_bat()
        finally:
            self.io = io
        h = self.header
        if h.log_offset + h.log_length > self.file_size:      # an empty log is only written later: check now
            raise FormatError("log", h.log_offset, f"the log [{h.log_offset}, {h.log_offset + h.log_length}) lies "
                              f"past the end of the file ({self.file_size} bytes)", self.path)
        if active:
            self._replay_log(active)
        self._init_write_state()
        if self.geometry.has_parent:
            self._open_parent(io_factory, depth)

    def _read_headers(self) -> tuple[S.Header, int]:
        found, errors = [], []
        for slot, off in enumerate(S.HEADER_OFFSETS):
            try:
                found.append((S.parse_header(self.io.pread(S.HEADER_SIZE, off), off, self.path), slot))
            except FormatError as e:
                errors.append(e.message)
        if not found:
            raise FormatError("headers", S.HEADER_OFFSETS[0], "neither header copy is valid: " + "; ".join(errors),
                              self.path)
        return max(found, key=lambda hs: hs[0].sequence_number)

    def _plan_replay(self):
        """Validate the pending log; a read-only open stops here (it may not write the replay)."""
        h = self.header
        if h.log_offset + h.log_length > self.file_size:
            raise FormatError("log", h.log_offset, f"log of {h.log_length} bytes extends past the end of the "
                              f"file ({self.file_size} bytes)", self.path)
        active = plan_replay(self.io, h, self.path)
        if self.read_only:
            raise LogReplayRequired(
                f"{self.path}: the VHDX log (LogGuid {h.log_guid}) holds updates that were not applied; "
                "open the file read-write once to replay it")
        return active

    def _replay_log(self, active) -> None:
        """Only after every structure validated: new FileWriteGuid (§2.2.2.1), replay, flush, clear LogGuid."""
        self._write_header(file_write_guid=uuid.uuid4())
        self._session_guids_written = True
        replay(self.io, active)
        self.io.fsync()
        self._write_header(log_guid=S.ZERO_GUID)
        self.file_size = self.io.size()

    def _read_region_table(self) -> dict[uuid.UUID, S.RegionEntry]:
        tables, errors = None, []
        for off in S.REGION_TABLE_OFFSETS:
            try:
                tables = S.parse_region_table(self.io.pread(S.REGION_TABLE_SIZE, off), off, self.path)
                self.region_table_offset = off
                break
            except FormatError as e:
                errors.append(e.message)
        if tables is None:
            raise FormatError("region tables", S.REGION_TABLE_OFFSETS[0],
                              "neither region table copy is valid: " + "; ".join(errors), self.path)
        self.region_table_errors = errors
        regions = {e.guid: e for e in tables}
        for e in tables:
            if e.required and e.guid not in (S.BAT_GUID, S.METADATA_GUID):
                raise UnsupportedFeature("region table", self.region_table_offset,
                                         f"required region {e.guid} is not understood", self.path)
            if e.file_offset + e.length > self.file_size:
                raise FormatError("region table", self.region_table_offset,
                                  f"{region_name(e.guid)} [{e.file_offset}, {e.file_offset + e.length}) lies past "
                                  f"the end of the file ({self.file_size} bytes): the file is truncated", self.path)
        for g, name in ((S.BAT_GUID, "BAT"), (S.METADATA_GUID, "metadata")):
            if g not in regions:
                raise FormatError("region table", self.region_table_offset, f"no {name} region", self.path)
        spans = [(e.file_offset, e.length, region_name(e.guid)) for e in tables]
        if self.header.log_length:
            spans.append((self.header.log_offset, self.header.log_length, "log"))
        spans.sort()
        for (a_off, a_len, a), (b_off, _, b) in zip(spans, spans[1:]):
            if b_off < a_off + a_len:
                raise FormatError("region table", self.region_table_offset, f"region {b} overlaps {a}", self.path)
        return regions

    def _read_metadata(self) -> None:
        region = self.regions[S.METADATA_GUID]
        table = self.io.pread(S.METADATA_TABLE_SIZE, region.file_offset)
        self.metadata_entries = S.parse_metadata_table(table, region.file_offset, region.length, self.path)
        items = {e.item_id: e for e in self.metadata_entries if not e.is_user}

        def item(guid, name):
            e = items.get(guid)
            if e is None:
                raise FormatError("metadata table", region.file_offset, f"required item {name} is missing",
                                  self.path)
            return self.io.pread(e.length, region.file_offset + e.offset), region.file_offset + e.offset

        fp = S.parse_file_parameters(*item(S.FILE_PARAMETERS, "file parameters"), self.path)
        lss = S.parse_u32_item(*item(S.LOGICAL_SECTOR_SIZE, "logical sector size"), "logical sector size",
                               (512, 4096), self.path)
        pss = S.parse_u32_item(*item(S.PHYSICAL_SECTOR_SIZE, "physical sector size"), "physical sector size",
                               (512, 4096), self.path)
        raw, at = item(S.VIRTUAL_DISK_SIZE, "virtual disk size")
        size = S.parse_disk_size(raw, at, lss, self.path)
        raw, at = item(S.VIRTUAL_DISK_ID, "virtual disk id")
        if len(raw) < 16:
            raise FormatError("virtual disk id metadata item", at, "shorter than 16 bytes", self.path)
        self.virtual_disk_id = S.guid_le(raw[:16])
        self.parent_locator = None
        if fp.has_parent:
            self.parent_locator = S.parse_parent_locator(*item(S.PARENT_LOCATOR, "parent locator"), self.path)
        self.geometry = Geometry(fp.block_size, lss, pss, size, fp.leave_block_allocated, fp.has_parent)
        self.size, self.logical_sector_size, self.physical_sector_size = size, lss, pss

    def _read_bat(self) -> None:
        g = self.geometry
        n_payload, _, ratio, n_entries = S.bat_geometry(g.disk_size, g.block_size, g.logical_sector_size,
                                                        g.has_parent)
        region = self.regions[S.BAT_GUID]
        if region.length < n_entries * 8:
            raise FormatError("BAT region", region.file_offset, f"{region.length} bytes cannot hold the "
                              f"{n_entries} entries a {g.disk_size}-byte disk needs", self.path)
        raw = self.io.pread(n_entries * 8, region.file_offset)
        self.bat = np.frombuffer(raw, dtype="<u8").astype(np.uint64)
        self.layout = BatLayout(ratio, n_payload, n_entries)
        self.bat_offset = region.file_offset
        reserved = [(0, S.HEADER_SECTION_SIZE, "header section")]
        reserved += [(e.file_offset, e.length, region_name(e.guid)) for e in self.regions.values()]
        if self.header.log_length:
            reserved.append((self.header.log_offset, self.header.log_length, "log"))
        self.reserved_spans = reserved
        validate_bat(self.bat, self.layout, block_size=g.block_size, has_parent=g.has_parent,
                     file_size=self.file_size, reserved=reserved, bat_offset=self.bat_offset, path=self.path)

    def _open_parent(self, io_factory, depth: int) -> None:
        if depth > 64:
            raise ParentError(f"{self.path}: differencing chain deeper than 64 disks (a loop?)")
        parent_path = resolve_parent(self.path, self.parent_locator)
        try:
            st = os.stat(parent_path)
        except OSError:
            pass                            # opening it reports the problem
        else:
            if (st.st_dev, st.st_ino) in self._chain_files:
                raise ParentError(f"{self.path}: parent {parent_path} is a disk of its own differencing chain "
                                  "(a loop)")
        parent = open_any_parent(parent_path, io_factory, depth + 1, self._chain_lock, self._chain_files)
        self.parent = parent
        data_guid = getattr(parent, "header", None)
        if data_guid is None:
            raise ParentError(f"{self.path}: parent {parent_path} is not a VHDX disk")
        check_linkage(self.path, parent_path, self.parent_locator, parent.header.data_write_guid)
        if parent.logical_sector_size != self.logical_sector_size:
            raise ParentError(f"{self.path}: parent {parent_path} has {parent.logical_sector_size}-byte logical "
                              f"sectors, the child {self.logical_sector_size}")
        self.parent_path = parent_path

    # ------------------------------------------------------------------ headers
    def _write_header(self, **changes) -> None:
        """§2.2.2.1: write the non-current copy, flush, then the other, so one valid header always exists."""
        for _ in range(2):
            new = self.header.evolve(sequence_number=self.header.sequence_number + 1, **changes)
            slot = 1 - self.header_slot
            self.io.pwrite(new.pack(), S.HEADER_OFFSETS[slot])
            self.io.fsync()
            self.header, self.header_slot = new, slot

    def prepare_for_writes(self) -> None:
        """Change the session's GUIDs now (two header writes, each flushed) rather than at the first write:
        for a disk about to serve a guest, whose first write must not wait for them."""
        self._begin_modification(user_visible=True)

    def _begin_modification(self, user_visible: bool) -> None:
        """New FileWriteGuid before the first change of a session; new DataWriteGuid before the first change
        a reader could see (change logs compare it to detect writes made while they were not tracking)."""
        changes = {}
        if not self._session_guids_written:
            changes["file_write_guid"] = uuid.uuid4()
        if user_visible and not self._data_guid_changed:
            changes["data_write_guid"] = uuid.uuid4()
        if changes:
            self._write_header(**changes)
            self._session_guids_written = True
            self._data_guid_changed = self._data_guid_changed or user_visible

    # ------------------------------------------------------------------ info
    @property
    def data_write_guid(self) -> uuid.UUID:
        return self.header.data_write_guid

    @property
    def subformat(self) -> str:
        if self.geometry.has_parent:
            return "differencing"
        return "fixed" if self.geometry.leave_block_allocated else "dynamic"

    def block_state_counts(self) -> dict[str, int]:
        states = (self.bat[self.layout.payload_indices()] & np.uint64(7)).astype(np.int64)
        values, counts = np.unique(states, return_counts=True)
        return {PayloadState(int(v)).name: int(c) for v, c in zip(values, counts)}

    def info(self) -> dict:
        g = self.geometry
        return {
            "path": self.path, "format": "vhdx", "subformat": self.subformat,
            "virtual_size": g.disk_size, "block_size": g.block_size,
            "logical_sector_size": g.logical_sector_size, "physical_sector_size": g.physical_sector_size,
            "leave_block_allocated": g.leave_block_allocated, "has_parent": g.has_parent,
            "virtual_disk_id": str(self.virtual_disk_id), "data_write_guid": str(self.header.data_write_guid),
            "file_write_guid": str(self.header.file_write_guid), "creator": self.creator,
            "file_size": self.io.size(), "chunk_ratio": self.layout.chunk_ratio,
            "bat_entries": self.layout.n_entries, "block_states": self.block_state_counts(),
            "log": {"offset": self.header.log_offset, "length": self.header.log_length},
            "parent": getattr(self, "parent_path", None),
            "parent_locator": dict(self.parent_locator.entries) if self.parent_locator else None,
        }

    # ------------------------------------------------------------------ close
    def close(self) -> None:
        if self.io.fd < 0:
            return
        try:
            if not self.read_only:
                self.flush()
                if self._session_guids_written and self.header.log_guid != S.ZERO_GUID:
                    self._write_header(log_guid=S.ZERO_GUID)
        finally:
            if getattr(self, "_spool", None) is not None:
                self._spool.stop()
                self._spool = None
            self._close_files()

    def _close_files(self) -> None:
        if getattr(self, "parent", None) is not None:
            self.parent.close()
            self.parent = None
        self.io.close()

    def _new_log_writer(self) -> LogWriter:
        return LogWriter(self.io, self.header.log_offset, self.header.log_length, uuid.uuid4())


def region_name(guid: uuid.UUID) -> str:
    return {S.BAT_GUID: "BAT region", S.METADATA_GUID: "metadata region"}.get(guid, f"region {guid}")


def open_any_parent(path: str, io_factory, depth: int, lock: bool = False, children: tuple = ()):
    return VhdxDisk.open(path, read_only=True, io_factory=io_factory, _depth=depth, _chain_lock=lock,
                         _children=children)
