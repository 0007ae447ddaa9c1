"""Checking a cycle while it is still arriving: every frame verified and the undo log captured as the
spool grows, so commit only has to apply.

A Precheck follows one upload request from byte 0: a thread reads the spool behind the writer, decodes
and verifies each frame, and copies the replica's current contents of the frame's range into a pending
undo log (undo/STREAM.pending). Commit uses the result only when nothing it relies on moved: the spool
is exactly what was checked, the replica is still at the stream's base generation, no apply is in
progress, and the image is the same file. Otherwise -- a resumed upload, a failed check, a restart --
commit does both itself, as before. A precheck is an optimization, never a second source of truth.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass

from .. import delta
from ..vhdx import VhdxDisk
from .undo import UndoCapture

log = logging.getLogger("replicator.replica")

PENDING_SUFFIX = ".pending"


@dataclass
class Prechecked:
    stream_id: str
    size: int                  # spool bytes checked (the whole stream, trailer included)
    header: object             # delta.StreamHeader
    ranges: list               # (offset, length) of every frame, in stream order
    undo_path: str | None      # sealed undo log of those ranges, taken at `generation` (None: not needed)
    generation: int
    image: str

    def discard(self) -> None:
        if self.undo_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.undo_path)


class Precheck:
    def __init__(self, disk, stream_id: str, spool_path: str):
        self.disk, self.stream_id, self.spool_path = disk, stream_id, spool_path
        self.undo_path = os.path.join(disk.path, "undo", f"{stream_id}{PENDING_SUFFIX}")
        self._cond = threading.Condition()
        self._size = 0
        self._ended = False
        self._result: Prechecked | None = None
        self._thread = threading.Thread(target=self._run, name=f"precheck {stream_id[:8]}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the spool writer's side
    def grew(self, size: int) -> None:
        """The spool now holds `size` bytes (written, not necessarily synced)."""
        with self._cond:
            self._size = size
            self._cond.notify_all()

    def finish(self) -> Prechecked | None:
        """The upload request ended; wait for the check and return its result (None when unusable)."""
        with self._cond:
            self._ended = True
            self._cond.notify_all()
        self._thread.join()
        return self._result

    # ------------------------------------------------------------------ the checking thread
    def _run(self) -> None:
        cap = None
        try:
            with open(self.spool_path, "rb") as f:
                dec = delta.checking_decoder(_Follow(self, f.fileno()), path=self.spool_path)
                gen, image = self.disk.state.generation, self.disk.image_path
                if not self._applicable(dec.header, gen):
                    return
                ranges = []
                if self.disk._needs_undo():
                    cap = UndoCapture(self.undo_path)
                    with VhdxDisk.open(image, read_only=True) as img:
                        for fr in delta.verified(dec):
                            ranges.append((fr.offset, fr.length))
                            cap.add(img, fr.offset, fr.length)
                    cap.seal()
                else:                       # no earlier points kept: nothing to capture (store._needs_undo)
                    ranges = [(fr.offset, fr.length) for fr in delta.verified(dec)]
                if self._applicable(dec.header, gen) and self.disk.image_path == image:
                    self._result = Prechecked(self.stream_id, dec.position, dec.header, ranges,
                                              self.undo_path if cap is not None else None, gen, image)
        except Exception as e:      # noqa: BLE001 -- commit checks again and reports what is wrong
            log.debug("precheck of %s not usable: %s", self.stream_id, e)
        finally:
            if self._result is None and cap is not None:
                cap.abandon()

    def _applicable(self, header, generation: int) -> bool:
        st = self.disk.state
        return generation == st.generation and st.journal is None and self.disk.header_problem(header) is None


class _Follow:
    """A file-like reader of the spool that waits for the writer (read(n) is short only at the end)."""

    def __init__(self, check: Precheck, fd: int):
        self.check, self.fd, self.pos = check, fd, 0

    def read(self, n: int) -> bytes:
        c = self.check
        with c._cond:
            while c._size < self.pos + n and not c._ended:
                c._cond.wait()
            n = min(n, c._size - self.pos)
        data = os.pread(self.fd, n, self.pos) if n > 0 else b""
        self.pos += len(data)
        return data
